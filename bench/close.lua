-- No client keep-alive: every request opens a new connection.
wrk.headers["Connection"] = "close"
