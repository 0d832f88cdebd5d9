-- POST a 64 KiB body.
wrk.method = "POST"
wrk.body = string.rep("x", 64 * 1024)
wrk.headers["Content-Type"] = "application/octet-stream"
