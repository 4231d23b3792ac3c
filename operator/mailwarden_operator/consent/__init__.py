"""The authorization-code consent flow: a small web server (`server`) with the consent page
and the OAuth 2.0 callback, PKCE (`pkce`), one-time `state` values (`state`) and the code
exchange (`exchange`). It never talks to Kubernetes itself: `handlers.authorization`
provides the backend that finds MailAccounts and stores what a consent produced."""
