"""mailwarden data plane: plain SMTP/IMAP/POP3 in, OAuth 2.0 out."""
