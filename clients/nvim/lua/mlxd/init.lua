-- mlxd.nvim: stream completions from the local mlxd daemon into Neovim buffers.
--
-- Speaks newline-delimited JSON-RPC 2.0 over the daemon's Unix socket (PROTOCOL.md).
-- One connection per socket path, opened on first use; one session per buffer
-- ("nvim-<pid>-<bufnr>"), so the daemon reuses the buffer's KV cache across completions.

local M = {}

local uv = vim.uv or vim.loop
local islist = vim.islist or vim.tbl_islist
local ns = vim.api.nvim_create_namespace("mlxd")

local REQUEST_CANCELLED = -32800

M.config = {
  socket = nil, -- nil: $MLXD_SOCKET, else the platform default (see M.default_socket())
  max_tokens = 256,
  temperature = 0,
  -- Delete this Neovim's sessions from the daemon when Neovim exits (their caches are
  -- useless to the next Neovim, which gets other session names).
  delete_sessions_on_exit = true,
  keymaps = {
    complete = "<leader>mm", -- normal and visual mode; false to disable
    cancel = "<leader>mc", -- normal mode; false to disable
  },
}

local jobs = {} -- bufnr -> the running completion
local last = {} -- bufnr -> the last finished completion
local sessions_used = {} -- session name -> true

local function notify(msg, level)
  vim.notify("mlxd: " .. msg, level or vim.log.levels.INFO)
end

local function is_null(v)
  return v == nil or v == vim.NIL
end

-- -- socket path -----------------------------------------------------------------------

function M.default_socket()
  local env = vim.env.MLXD_SOCKET
  if env and env ~= "" then
    return vim.fn.expand(env)
  end
  if uv.os_uname().sysname == "Darwin" then
    return uv.os_homedir() .. "/Library/Application Support/mlxd/mlxd.sock"
  end
  local runtime = vim.env.XDG_RUNTIME_DIR
  if runtime and runtime ~= "" then
    return runtime .. "/mlxd/mlxd.sock"
  end
  return "/tmp/mlxd-" .. uv.getuid() .. "/mlxd.sock"
end

function M.socket_path()
  if M.config.socket and M.config.socket ~= "" then
    return vim.fn.expand(M.config.socket)
  end
  return M.default_socket()
end

-- -- connection ------------------------------------------------------------------------

local Conn = {}
Conn.__index = Conn

local conn -- the current connection, or nil

-- Called with the connection's failure reason for every request still waiting.
local function fail_all(pending, reason)
  for _, handler in pairs(pending) do
    handler.on_reply(nil, { message = reason })
  end
end

function Conn.new(path)
  local self = setmetatable({
    path = path,
    pipe = uv.new_pipe(false),
    connected = false,
    closed = false,
    next_id = 1,
    pending = {}, -- id -> {on_delta, on_reply}
    queue = {}, -- lines written before the connection was up
    partial = {}, -- chunks of an incomplete incoming line
  }, Conn)
  self.pipe:connect(path, function(err)
    vim.schedule(function()
      if self.closed then
        return
      end
      if err then
        self:fail(
          ("cannot connect to %s (%s); is the daemon running? (mlxd serve)"):format(path, err)
        )
        return
      end
      self.connected = true
      self.pipe:read_start(function(rerr, data)
        -- Fast context: hand the bytes to the main loop, in order.
        vim.schedule(function()
          self:on_read(rerr, data)
        end)
      end)
      local queued = self.queue
      self.queue = {}
      for _, line in ipairs(queued) do
        self:write(line)
      end
    end)
  end)
  return self
end

function Conn:write(line)
  if not self.connected then
    table.insert(self.queue, line)
    return
  end
  self.pipe:write(line, function(err)
    if err then
      vim.schedule(function()
        self:fail("writing to the daemon failed: " .. err)
      end)
    end
  end)
end

function Conn:send(message)
  self:write(vim.json.encode(message) .. "\n")
end

-- Send a request; handlers.on_reply(result, error) gets exactly one call.
function Conn:request(method, params, handlers)
  local id = self.next_id
  self.next_id = id + 1
  self.pending[id] = handlers
  self:send({ jsonrpc = "2.0", id = id, method = method, params = params or vim.empty_dict() })
  return id
end

function Conn:notify(method, params)
  self:send({ jsonrpc = "2.0", method = method, params = params })
end

function Conn:on_read(err, data)
  if self.closed then
    return
  end
  if err then
    self:fail("connection to the daemon lost: " .. err)
    return
  end
  if data == nil then
    self:fail("the daemon closed the connection")
    return
  end
  -- Newline-delimited JSON: a read may hold several lines, or part of one.
  local start = 1
  while true do
    local nl = data:find("\n", start, true)
    if not nl then
      break
    end
    table.insert(self.partial, data:sub(start, nl - 1))
    local line = table.concat(self.partial)
    self.partial = {}
    self:on_line(line)
    if self.closed then
      return
    end
    start = nl + 1
  end
  if start <= #data then
    table.insert(self.partial, data:sub(start))
  end
end

function Conn:on_line(line)
  line = line:gsub("\r$", "")
  if line == "" then
    return
  end
  local ok, message = pcall(vim.json.decode, line)
  if not ok or type(message) ~= "table" then
    notify("invalid JSON from the daemon: " .. line:sub(1, 200), vim.log.levels.ERROR)
    return
  end
  if islist(message) then -- a batch
    for _, item in ipairs(message) do
      self:on_message(item)
    end
  else
    self:on_message(message)
  end
end

function Conn:on_message(message)
  if type(message) ~= "table" then
    return
  end
  if message.method ~= nil then -- a notification
    local params = message.params
    if message.method == "generate/delta" and type(params) == "table" then
      local handler = self.pending[params.id]
      if handler and handler.on_delta then
        handler.on_delta(params)
      end
    end
    return
  end
  local id = message.id
  if is_null(id) then -- the daemon could not read something we sent
    if type(message.error) == "table" then
      notify("daemon error: " .. tostring(message.error.message), vim.log.levels.ERROR)
    end
    return
  end
  local handler = self.pending[id]
  if not handler then
    return
  end
  self.pending[id] = nil
  if not is_null(message.error) then
    handler.on_reply(nil, message.error)
  else
    handler.on_reply(message.result, nil)
  end
end

function Conn:close()
  if self.closed then
    return
  end
  self.closed = true
  if conn == self then
    conn = nil
  end
  if not self.pipe:is_closing() then
    self.pipe:close()
  end
end

function Conn:fail(reason)
  if self.closed then
    return
  end
  self:close()
  local pending = self.pending
  self.pending = {}
  fail_all(pending, reason)
end

local function connection()
  local path = M.socket_path()
  if conn and conn.path ~= path then
    conn:fail("the socket path changed")
  end
  if not conn or conn.closed then
    conn = Conn.new(path)
  end
  return conn
end

-- -- text helpers ----------------------------------------------------------------------

-- Bytes of the UTF-8 character starting at 0-based byte `col` of `line`.
local function char_len(line, col)
  local b = line:byte(col + 1)
  if not b then
    return 0
  end
  local n = (b >= 0xF0 and 4) or (b >= 0xE0 and 3) or (b >= 0xC0 and 2) or 1
  return math.min(n, #line - col)
end

-- JSON strings must be UTF-8: replace invalid bytes (a Latin-1 file, say) with U+FFFD.
local function valid_utf8(s)
  if not s:find("[\128-\255]") then
    return s
  end
  local out, i, n = {}, 1, #s
  while i <= n do
    local b = s:byte(i)
    local len = (b < 0x80 and 1) or (b >= 0xC2 and b < 0xE0 and 2) or (b >= 0xE0 and b < 0xF0 and 3)
      or (b >= 0xF0 and b < 0xF5 and 4) or 0
    local ok = len > 0 and i + len - 1 <= n
    for k = 1, len - 1 do
      local c = ok and s:byte(i + k)
      if not c or c < 0x80 or c > 0xBF then
        ok = false
        break
      end
    end
    if ok then
      table.insert(out, s:sub(i, i + len - 1))
      i = i + len
    else
      table.insert(out, "\239\191\189")
      i = i + 1
    end
  end
  return table.concat(out)
end

-- The prompt for a completion and where its text goes: {prompt, row, col} (0-based).
-- Without a range: the buffer up to the cursor; in normal mode the character under the
-- cursor is included and the completion goes after it (like `a`), in insert mode it goes
-- at the cursor. With a range: the visual selection (charwise when it matches the last
-- `v` selection, else whole lines), and the completion goes right after it.
local function prompt_and_position(buf, opts)
  if opts.range and opts.range > 0 then
    local s = vim.api.nvim_buf_get_mark(buf, "<")
    local e = vim.api.nvim_buf_get_mark(buf, ">")
    local charwise = opts.range == 2
      and vim.fn.visualmode() == "v"
      and s[1] == opts.line1
      and e[1] == opts.line2
    local lines = vim.api.nvim_buf_get_lines(buf, opts.line1 - 1, opts.line2, false)
    if #lines == 0 then
      return nil
    end
    if charwise then
      local lastl = lines[#lines]
      local end_col = math.min(e[2] + char_len(lastl, math.min(e[2], #lastl)), #lastl)
      lines[#lines] = lastl:sub(1, end_col)
      lines[1] = lines[1]:sub(s[2] + 1)
      return table.concat(lines, "\n"), opts.line2 - 1, end_col
    end
    return table.concat(lines, "\n"), opts.line2 - 1, #lines[#lines]
  end
  local win = vim.api.nvim_get_current_win()
  if vim.api.nvim_win_get_buf(win) ~= buf then
    win = vim.fn.bufwinid(buf)
  end
  local row, col
  if win ~= -1 then
    local cursor = vim.api.nvim_win_get_cursor(win)
    row, col = cursor[1] - 1, cursor[2]
  else -- not shown in a window: the end of the buffer
    row = vim.api.nvim_buf_line_count(buf) - 1
    col = math.huge
  end
  local before = vim.api.nvim_buf_get_lines(buf, 0, row + 1, false)
  local line = before[#before] or ""
  col = math.min(col, #line)
  if col < #line and not vim.api.nvim_get_mode().mode:match("^[iR]") then
    col = col + char_len(line, col)
  end
  before[#before] = line:sub(1, col)
  return table.concat(before, "\n"), row, col
end

-- -- completions -----------------------------------------------------------------------

function M.session_name(buf)
  return ("nvim-%d-%d"):format(vim.fn.getpid(), buf)
end

local function insert(job, text)
  if text == "" then
    return true
  end
  local buf = job.bufnr
  if not vim.api.nvim_buf_is_valid(buf) then
    return false
  end
  local pos = vim.api.nvim_buf_get_extmark_by_id(buf, ns, job.mark, {})
  if not pos or #pos < 2 then
    return false
  end
  local row, col = pos[1], pos[2]
  local lines = vim.split(text, "\n", { plain = true })
  if job.inserted and buf == vim.api.nvim_get_current_buf() then
    pcall(vim.cmd, "undojoin") -- the whole completion is one undo step
  end
  local ok, err = pcall(vim.api.nvim_buf_set_text, buf, row, col, row, col, lines)
  if not ok then
    notify("cannot insert the completion: " .. tostring(err), vim.log.levels.ERROR)
    return false
  end
  local end_row = row + #lines - 1
  local end_col = (#lines == 1) and (col + #lines[1]) or #lines[#lines]
  vim.api.nvim_buf_set_extmark(buf, ns, end_row, end_col, { id = job.mark })
  job.inserted = true
  table.insert(job.chunks, text)
  return true
end

local function inserted_text(job)
  return table.concat(job.chunks)
end

-- Insert what the final text holds beyond what the deltas brought (normally nothing).
local function insert_rest(job, final_text)
  if type(final_text) ~= "string" then
    return
  end
  local have = inserted_text(job)
  if #final_text > #have and final_text:sub(1, #have) == have then
    insert(job, final_text:sub(#have + 1))
  end
end

local function summary(result)
  local usage = type(result.usage) == "table" and result.usage or {}
  local timings = type(result.timings) == "table" and result.timings or {}
  return ("%d tokens, %d of %d prompt tokens cached, %.0f tok/s, ttft %.0f ms"):format(
    tonumber(usage.completion_tokens) or 0,
    tonumber(usage.cached_tokens) or 0,
    tonumber(usage.prompt_tokens) or 0,
    tonumber(timings.tokens_per_s) or 0,
    tonumber(timings.ttft_ms) or 0
  )
end

local function finish(job, result, err)
  if jobs[job.bufnr] == job then
    jobs[job.bufnr] = nil
  end
  if vim.api.nvim_buf_is_valid(job.bufnr) then
    if result then
      insert_rest(job, result.text)
    elseif err and err.code == REQUEST_CANCELLED and type(err.data) == "table" then
      insert_rest(job, err.data.text)
    end
    pcall(vim.api.nvim_buf_del_extmark, job.bufnr, ns, job.mark)
  end
  last[job.bufnr] = {
    id = job.id,
    session = job.session,
    prompt = job.prompt,
    deltas = job.deltas,
    text = inserted_text(job),
    result = result,
    error = err,
  }
  if result then
    vim.api.nvim_echo({ { "mlxd: " .. summary(result) } }, false, {})
  elseif err and err.code == REQUEST_CANCELLED then
    notify("completion cancelled")
  elseif err then
    local code = is_null(err.code) and "" or (" (" .. tostring(err.code) .. ")")
    notify(tostring(err.message) .. code, vim.log.levels.ERROR)
  end
  pcall(vim.api.nvim_exec_autocmds, "User", { pattern = "MlxdDone", modeline = false })
end

-- Start a completion in a buffer. opts: bufnr, range/line1/line2 (from a command),
-- max_tokens, temperature. Returns the request id, or nil.
function M.complete(opts)
  opts = opts or {}
  local buf = opts.bufnr or vim.api.nvim_get_current_buf()
  if buf == 0 then
    buf = vim.api.nvim_get_current_buf()
  end
  if jobs[buf] then
    notify("a completion is already running in this buffer (:MlxdCancel)", vim.log.levels.WARN)
    return nil
  end
  local prompt, row, col = prompt_and_position(buf, opts)
  if not prompt or prompt == "" then
    notify("nothing to complete: the prompt is empty", vim.log.levels.WARN)
    return nil
  end
  local session = M.session_name(buf)
  local job = {
    bufnr = buf,
    session = session,
    prompt = prompt,
    chunks = {},
    deltas = 0,
    mark = vim.api.nvim_buf_set_extmark(buf, ns, row, col, {}),
  }
  jobs[buf] = job
  sessions_used[session] = true
  local c = connection()
  job.conn = c
  job.id = c:request("generate", {
    prompt = valid_utf8(prompt),
    session = session,
    max_tokens = opts.max_tokens or M.config.max_tokens,
    temperature = opts.temperature or M.config.temperature,
    stream = true,
  }, {
    on_delta = function(params)
      job.deltas = job.deltas + 1
      if type(params.text) == "string" and not insert(job, params.text) and not job.cancelling then
        M.cancel(buf, { quiet = true }) -- the buffer is gone or read-only
      end
    end,
    on_reply = function(result, err)
      finish(job, result, err)
    end,
  })
  return job.id
end

-- Cancel the running completion of a buffer (the current one by default).
function M.cancel(buf, opts)
  opts = opts or {}
  buf = (buf == nil or buf == 0) and vim.api.nvim_get_current_buf() or buf
  local job = jobs[buf]
  if not job then
    if not opts.quiet then
      notify("no completion running in this buffer", vim.log.levels.WARN)
    end
    return false
  end
  job.cancelling = true
  if not job.conn.closed then
    job.conn:notify("$/cancelRequest", { id = job.id })
  end
  return true
end

function M.cancel_all()
  local n = 0
  for buf in pairs(jobs) do
    if M.cancel(buf, { quiet = true }) then
      n = n + 1
    end
  end
  return n
end

-- The running completion of a buffer (nil if none) and the last finished one.
function M.job(buf)
  return jobs[(buf == nil or buf == 0) and vim.api.nvim_get_current_buf() or buf]
end

function M.last(buf)
  return last[(buf == nil or buf == 0) and vim.api.nvim_get_current_buf() or buf]
end

function M.running(buf)
  return M.job(buf) ~= nil
end

-- -- status ----------------------------------------------------------------------------

local function format_status(s)
  local model = type(s.model) == "table" and s.model.id or "?"
  local pool = type(s.pool) == "table" and s.pool or {}
  local queue = type(s.queue) == "table" and s.queue or {}
  local sess = type(s.sessions) == "table" and s.sessions or {}
  return ("%s · %s · %d active · queue %d/%d · pool %.0f%% · sessions %d hot %d disk"):format(
    tostring(s.state),
    tostring(model),
    tonumber(s.active) or 0,
    tonumber(queue.depth) or 0,
    tonumber(queue.limit) or 0,
    100 * (tonumber(pool.utilization) or 0),
    tonumber(sess.hot) or 0,
    tonumber(sess.disk) or 0
  )
end

-- Ask the daemon for its status; echo it, or pass (result, err) to `callback`.
function M.status(callback)
  connection():request("status", nil, {
    on_reply = function(result, err)
      if callback then
        callback(result, err)
      elseif err then
        notify(tostring(err.message), vim.log.levels.ERROR)
      else
        vim.api.nvim_echo({ { "mlxd: " .. format_status(result) } }, true, {})
      end
    end,
  })
end

-- -- exit ------------------------------------------------------------------------------

-- Delete the sessions this Neovim made, waiting at most `timeout_ms` for the replies.
function M.delete_sessions(timeout_ms)
  M.cancel_all()
  local waiting = 0
  for session in pairs(sessions_used) do
    waiting = waiting + 1
    connection():request("sessions/delete", { session = session }, {
      on_reply = function()
        waiting = waiting - 1
      end,
    })
  end
  sessions_used = {}
  if waiting > 0 then
    vim.wait(timeout_ms or 1000, function()
      return waiting == 0
    end, 10)
  end
end

-- -- setup -----------------------------------------------------------------------------

local group = vim.api.nvim_create_augroup("mlxd", { clear = true })
vim.api.nvim_create_autocmd("VimLeavePre", {
  group = group,
  callback = function()
    if M.config.delete_sessions_on_exit and next(sessions_used) then
      pcall(M.delete_sessions, 1000)
    end
  end,
})

local mapped = {}

function M.setup(opts)
  opts = opts or {}
  local keymaps = vim.tbl_extend("force", M.config.keymaps, opts.keymaps or {})
  M.config = vim.tbl_extend("force", M.config, opts)
  M.config.keymaps = keymaps
  for _, m in ipairs(mapped) do
    pcall(vim.keymap.del, m[1], m[2])
  end
  mapped = {}
  if keymaps.complete then
    vim.keymap.set("n", keymaps.complete, "<Cmd>MlxdComplete<CR>", { desc = "mlxd: complete" })
    vim.keymap.set("x", keymaps.complete, ":MlxdComplete<CR>", { desc = "mlxd: complete selection" })
    table.insert(mapped, { "n", keymaps.complete })
    table.insert(mapped, { "x", keymaps.complete })
  end
  if keymaps.cancel then
    vim.keymap.set("n", keymaps.cancel, function()
      M.cancel()
    end, { desc = "mlxd: cancel completion" })
    table.insert(mapped, { "n", keymaps.cancel })
  end
  return M
end

return M
