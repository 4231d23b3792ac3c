"""Sans-I/O protocol cores: they consume bytes and emit actions; no sockets, no asyncio.

Each core (`imap`, `smtp`, `pop3`) drives one proxied session from connect to login:
it reads the upstream greeting and capabilities, greets the client with a rewritten
capability list, performs STARTTLS on either side, takes the client's password login,
and authenticates upstream with XOAUTH2 or OAUTHBEARER. After that it hands over with
`Splice` and the I/O layer relays raw bytes; the core never sees traffic after login.
"""
