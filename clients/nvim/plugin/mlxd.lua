-- Commands of mlxd.nvim; `require("mlxd").setup{}` sets options and keymaps.
if vim.g.loaded_mlxd then
  return
end
vim.g.loaded_mlxd = true

vim.api.nvim_create_user_command("MlxdComplete", function(opts)
  require("mlxd").complete({ range = opts.range, line1 = opts.line1, line2 = opts.line2 })
end, { range = true, desc = "mlxd: stream a completion of the text up to the cursor (or the selection)" })

vim.api.nvim_create_user_command("MlxdCancel", function(opts)
  local mlxd = require("mlxd")
  if opts.bang then
    mlxd.cancel_all()
  else
    mlxd.cancel()
  end
end, { bang = true, desc = "mlxd: cancel this buffer's completion (! for all)" })

vim.api.nvim_create_user_command("MlxdStatus", function()
  require("mlxd").status()
end, { desc = "mlxd: show the daemon's status" })
