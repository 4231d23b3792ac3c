"""Known upstream and identity-provider failures: what each means and what fixes it.

Data, not logic: one `Entry` per failure with a stable reason code. The proxy logs the
reason and the hint on every failed login, counts failures by reason, the operator puts
them into the MailAccount's conditions, `docs/troubleshooting.md` is generated from
`ENTRIES`, and `doctor` prints the hint of the first failing step.

Reason codes are part of the interface (alerts and runbooks key on them): add new ones,
never rename or reuse one.

Recognising a failure (`diagnose_token_error`, `diagnose_reply`, `diagnose_connection`)
is a plain text search: an entry applies when one of its `matches` occurs in the
provider's answer as a whole word (case-insensitive), and the longest such match wins,
so `535 5.7.139 … SmtpClientAuthentication is disabled` beats a bare `535 5.7.139`. For
token errors the identity provider's description is searched before its bare OAuth
error code, so `AADSTS70043` beats `invalid_grant`. An answer nothing matches gets a
generic entry of its stage, temporary or not, so every failure has a reason. Pure: no
I/O, nothing here logs.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class Stage(StrEnum):
    """Where in the chain the failure shows."""

    TOKEN = "token"  # the identity provider's token endpoint
    CONNECT = "connect"  # DNS / TCP to the mail server
    TLS = "tls"  # TLS handshake or certificate check with the mail server
    SMTP = "smtp"
    IMAP = "imap"
    POP3 = "pop3"
    MAIL = "mail"  # the login at the mail server, whichever protocol (SMTP, IMAP, POP3)
    LOCAL = "local"  # between the application and the proxy


@dataclass(frozen=True)
class Entry:
    reason: str  # stable code, CamelCase, e.g. "SmtpAuthDisabled"
    provider: str  # "microsoft" | "google" | "any"
    stage: Stage
    cause: str  # one sentence: what is wrong
    fix: str  # what to do: a short paragraph of plain text
    temporary: bool  # trying again later can succeed without anyone changing anything
    matches: tuple[str, ...] = ()  # the provider's codes or texts that identify it, verbatim


@dataclass(frozen=True)
class Diagnosis:
    """A failure as recognised: the entry plus the provider's own code for the log."""

    entry: Entry
    provider_code: str = ""  # e.g. "AADSTS7000215", "535 5.7.139", "invalid_grant"

    @property
    def reason(self) -> str:
        return self.entry.reason


_MS = "microsoft"
_GOOGLE = "google"
_ANY = "any"

# Texts used by several entries' fixes.
_APP_ONLY_MAILBOX = (
    "For app-only access (clientCredentials with IMAP.AccessAsApp / SMTP.SendAsApp / "
    "POP.AccessAsApp), register the app in Exchange Online and grant it the mailbox: in "
    "Exchange Online PowerShell run New-ServicePrincipal -AppId <Application (client) ID> "
    "-ObjectId <Object ID shown under Entra admin center > Enterprise applications, not the "
    "one under App registrations>, then Add-MailboxPermission -Identity <mailbox> -User "
    "<the new service principal's Identity> -AccessRights FullAccess. Changes take up to "
    "30 minutes to apply."
)
_DELEGATED_USER = (
    "For delegated flows the login name must be the mailbox of the user who signed in "
    "(the MailAccount's spec.username, or upstream_username in the proxy configuration)."
)
_NEW_CONSENT = (
    "Sign in again: for an operator-managed MailAccount delete the Secret "
    "<mailaccount>-oauth2-token (the operator then publishes a new device code or consent "
    "link in status.authorization); for the standalone proxy obtain a new refresh token "
    "and put it into refresh_token."
)

ENTRIES: tuple[Entry, ...] = (
    # -- the identity provider: Microsoft Entra ID (AADSTS codes) -------------------------
    Entry(
        "InvalidClientSecret",
        _MS,
        Stage.TOKEN,
        "The client secret sent to Entra ID is wrong: a typo, the Secret ID copied instead "
        "of its Value, or a secret of another app registration.",
        "Entra admin center > App registrations > <app> > Certificates & secrets > New client "
        "secret; copy the secret's Value (shown once, not the Secret ID) into the Kubernetes "
        "Secret named by spec.oauth2.clientSecretRef (key client-secret) or into "
        "client_secret, and delete the old secret.",
        False,
        ("AADSTS7000215",),
    ),
    Entry(
        "ClientSecretExpired",
        _MS,
        Stage.TOKEN,
        "The app registration's client secret has expired.",
        "Entra admin center > App registrations > <app> > Certificates & secrets: add a new "
        "client secret, put its Value into the Secret named by spec.oauth2.clientSecretRef "
        "(or client_secret), and note its expiry date for the next rotation.",
        False,
        ("AADSTS7000222",),
    ),
    Entry(
        "ApplicationNotFound",
        _MS,
        Stage.TOKEN,
        "Entra ID knows no application with this client ID in this tenant.",
        "Copy the Application (client) ID from Entra admin center > App registrations > <app> "
        "> Overview into clientId, and the Directory (tenant) ID from the same page into "
        "tenantId. For an app registered in another tenant, an administrator of this tenant "
        "must consent to it first, which creates its enterprise application here.",
        False,
        ("AADSTS700016",),
    ),
    Entry(
        "ConsentMissing",
        _MS,
        Stage.TOKEN,
        "Nobody has consented to the permissions the app asks for.",
        "Entra admin center > App registrations > <app> > API permissions: add the "
        "permissions (delegated flows: Microsoft Graph > IMAP.AccessAsUser.All, "
        "POP.AccessAsUser.All, SMTP.Send, offline_access; clientCredentials: APIs my "
        "organization uses > Office 365 Exchange Online > Application permissions > "
        "IMAP.AccessAsApp, POP.AccessAsApp, SMTP.SendAsApp), then Grant admin consent for "
        "<tenant>.",
        False,
        ("AADSTS65001",),
    ),
    Entry(
        "MfaRequired",
        _MS,
        Stage.TOKEN,
        "The user must pass multi-factor authentication, which the password (ROPC) flow cannot do.",
        "Switch spec.oauth2.flow to deviceCode or authorizationCode (a person signs in once "
        "with MFA, the operator keeps the refresh token alive), or to clientCredentials with "
        "application permissions for unattended mailboxes. Excluding the account from the "
        "Conditional Access policy that demands MFA is the last resort.",
        False,
        ("AADSTS50076",),
    ),
    Entry(
        "MfaRegistrationRequired",
        _MS,
        Stage.TOKEN,
        "The user has to register for multi-factor authentication (security defaults or a "
        "policy demand it), which the password (ROPC) flow cannot do.",
        "Sign in once as the user at https://aka.ms/mfasetup to register MFA, then use the "
        "deviceCode or authorizationCode flow instead of password; or use clientCredentials "
        "with application permissions.",
        False,
        ("AADSTS50079",),
    ),
    Entry(
        "RefreshTokenExpired",
        _MS,
        Stage.TOKEN,
        "The refresh token has expired: unused for 90 days, or older than the sign-in "
        "frequency a Conditional Access policy allows.",
        _NEW_CONSENT + " If a sign-in frequency policy applies (Entra admin center > "
        "Protection > Conditional Access), this repeats at that interval: exclude the "
        "account or use clientCredentials.",
        False,
        ("AADSTS70043", "AADSTS700082"),
    ),
    Entry(
        "RefreshTokenRevoked",
        _MS,
        Stage.TOKEN,
        "The refresh token was revoked: the user's password changed, an administrator "
        "revoked the sessions, or the token was used after being replaced.",
        _NEW_CONSENT,
        False,
        ("AADSTS50173", "AADSTS50089", "AADSTS700084"),
    ),
    Entry(
        "AuthorizationCodeRedeemed",
        _MS,
        Stage.TOKEN,
        "The authorization code from the consent redirect was used twice (codes are single-use).",
        "Open the consent link from the MailAccount's status.authorization again and finish "
        "the sign-in once; don't reload or resubmit the callback page.",
        False,
        ("AADSTS54005",),
    ),
    Entry(
        "AuthorizationCodeExpired",
        _MS,
        Stage.TOKEN,
        "The authorization code expired before it was redeemed, or it was issued for "
        "another client or redirect URI.",
        "Open the consent link from status.authorization again and complete the sign-in "
        "within a few minutes.",
        False,
        ("AADSTS70008",),
    ),
    Entry(
        "InvalidUsernameOrPassword",
        _MS,
        Stage.TOKEN,
        "Entra ID refused the user's password (password flow).",
        "Check the password in the Secret named by spec.oauth2.passwordRef (or password); "
        "federated users (ADFS, Okta) cannot use the password flow at all: use deviceCode "
        "or authorizationCode.",
        False,
        ("AADSTS50126",),
    ),
    Entry(
        "UserNotFound",
        _MS,
        Stage.TOKEN,
        "The user name does not exist in this tenant.",
        "Use the user's User principal name (Entra admin center > Users > <user> > Overview) "
        "as username, and the tenant the user belongs to as tenantId.",
        False,
        ("AADSTS50034",),
    ),
    Entry(
        "UserDisabled",
        _MS,
        Stage.TOKEN,
        "The user account is disabled or locked.",
        "Microsoft 365 admin center > Users > Active users > <user>: unblock sign-in (or "
        "Entra admin center > Users > <user> > Edit properties > Account enabled); a lock "
        "after failed sign-ins clears by itself.",
        False,
        ("AADSTS50057", "AADSTS50053"),
    ),
    Entry(
        "PasswordExpired",
        _MS,
        Stage.TOKEN,
        "The user's password has expired or must be changed at next sign-in.",
        "Sign in once as the user at https://portal.office.com and change the password, then "
        "update it in the Secret; better, switch to deviceCode or authorizationCode.",
        False,
        ("AADSTS50055", "AADSTS50144"),
    ),
    Entry(
        "ClientClockSkew",
        _ANY,
        Stage.TOKEN,
        "The signed client assertion is outside its valid time range: the clock of the "
        "machine running mailwarden is wrong.",
        "Synchronise the node's clock (chrony or systemd-timesyncd against an NTP server); "
        "assertions are valid for minutes only.",
        False,
        ("AADSTS700024", "Token must be a short-lived token"),
    ),
    Entry(
        "CertificateNotRegistered",
        _MS,
        Stage.TOKEN,
        "The certificate that signed the client assertion is not registered for the app.",
        "Entra admin center > App registrations > <app> > Certificates & secrets > "
        "Certificates > Upload certificate: upload the public certificate (.crt/.pem) whose "
        "key is in the Secret named by spec.oauth2.clientCertificateRef.",
        False,
        ("AADSTS700027", "AADSTS700023"),
    ),
    Entry(
        "PublicClientFlowsDisabled",
        _MS,
        Stage.TOKEN,
        "The device code or password flow was used without a client secret, but the app "
        "registration is not allowed to act as a public client.",
        "Entra admin center > App registrations > <app> > Authentication > Advanced settings "
        "> Allow public client flows: Yes, then Save (or give the MailAccount the app's "
        "client secret).",
        False,
        ("AADSTS7000218",),
    ),
    Entry(
        "TenantNotFound",
        _MS,
        Stage.TOKEN,
        "Entra ID knows no tenant by this ID or domain.",
        "Set tenantId to the Directory (tenant) ID from Entra admin center > Overview, or to "
        "a verified domain of the tenant (contoso.onmicrosoft.com); check for typos and for "
        "a token URL of another cloud (login.microsoftonline.us for GCC High).",
        False,
        ("AADSTS90002",),
    ),
    Entry(
        "ExchangeNotFoundInTenant",
        _MS,
        Stage.TOKEN,
        "The tenant has no Exchange Online service principal: the scope names another "
        "resource, or the tenant has no Exchange Online licence.",
        "Use the scopes https://outlook.office365.com/.default (clientCredentials) or "
        "https://outlook.office.com/IMAP.AccessAsUser.All, "
        "https://outlook.office.com/SMTP.Send and offline_access (delegated), and check in the "
        "Microsoft 365 admin center > Billing > Licenses that the tenant has Exchange Online.",
        False,
        ("AADSTS500011",),
    ),
    Entry(
        "InvalidScope",
        _MS,
        Stage.TOKEN,
        "The scopes requested are not valid for this flow.",
        "clientCredentials takes exactly https://outlook.office365.com/.default; delegated "
        "flows take https://outlook.office.com/IMAP.AccessAsUser.All, "
        "https://outlook.office.com/POP.AccessAsUser.All, https://outlook.office.com/SMTP.Send "
        "and offline_access (spec.oauth2.scopes, or leave them to the provider preset).",
        False,
        ("AADSTS70011", "AADSTS1002012", "invalid_scope"),
    ),
    Entry(
        "RedirectUriMismatch",
        _MS,
        Stage.TOKEN,
        "The redirect URI of the consent request is not registered for the app.",
        "Entra admin center > App registrations > <app> > Authentication > Add a platform > "
        "Web: add the redirect URI shown in the consent link (the operator's external base "
        "URL followed by /oauth2/callback) exactly, including the scheme and any path prefix.",
        False,
        ("AADSTS50011",),
    ),
    Entry(
        "BlockedByConditionalAccess",
        _MS,
        Stage.TOKEN,
        "A Conditional Access policy blocks this sign-in (location, device, client app).",
        "Entra admin center > Monitoring & health > Sign-in logs: open the failed sign-in, "
        "tab Conditional Access, to see which policy applied; exclude the account or the "
        "app, or add the cluster's egress IPs to a trusted named location.",
        False,
        ("AADSTS53003", "AADSTS53000", "AADSTS530003"),
    ),
    # -- the identity provider: Google ---------------------------------------------------
    Entry(
        "GoogleDelegationMissing",
        _GOOGLE,
        Stage.TOKEN,
        "The service account may not act for users: domain-wide delegation is not set up "
        "for its client ID, or not for the scope https://mail.google.com/.",
        "Google Admin console > Security > Access and data control > API controls > Manage "
        "Domain Wide Delegation > Add new: the service account's numeric Client ID (Google "
        "Cloud console > IAM & Admin > Service Accounts > <account> > Advanced settings, not "
        "its e-mail address) with the OAuth scope https://mail.google.com/. It can take up "
        "to 24 hours to apply.",
        False,
        ("Client is unauthorized to retrieve access tokens using this method",),
    ),
    Entry(
        "GoogleUserNotFound",
        _GOOGLE,
        Stage.TOKEN,
        "The user the service account should act for is not a user of the Workspace domain.",
        "Set username to the primary address of an existing Google Workspace user (not an "
        "alias, a group, or a consumer gmail.com address: domain-wide delegation works for "
        "the domain's own users only).",
        False,
        ("Invalid email or User ID",),
    ),
    Entry(
        "GoogleRefreshTokenExpired",
        _GOOGLE,
        Stage.TOKEN,
        "Google expired or revoked the refresh token: the OAuth consent screen is in "
        "Testing (tokens last 7 days), the user revoked access, or changed the password.",
        "Google Cloud console > APIs & Services > OAuth consent screen > Publishing status: "
        "Publish app (In production), then sign in again. " + _NEW_CONSENT,
        False,
        ("Token has been expired or revoked",),
    ),
    Entry(
        "GoogleServiceAccountKeyInvalid",
        _GOOGLE,
        Stage.TOKEN,
        "Google refused the service account key's signature: the key was deleted or "
        "belongs to another service account.",
        "Google Cloud console > IAM & Admin > Service Accounts > <account> > Keys > Add key > "
        "Create new key (JSON), and put the downloaded file into the Secret named by "
        "spec.oauth2.serviceAccountKeyRef unchanged.",
        False,
        ("Invalid JWT Signature",),
    ),
    Entry(
        "GoogleClientNotFound",
        _GOOGLE,
        Stage.TOKEN,
        "Google knows no OAuth client with this ID and secret, or it was deleted.",
        "Google Cloud console > APIs & Services > Credentials: create (or pick) an OAuth "
        "client ID of type Web application and use its client_secret JSON as downloaded "
        "(client ID and secret from the same file).",
        False,
        ("The OAuth client was not found", "deleted_client"),
    ),
    Entry(
        "GoogleAppBlockedByAdmin",
        _GOOGLE,
        Stage.TOKEN,
        "The Workspace administrator's API access controls do not allow this app.",
        "Google Admin console > Security > Access and data control > API controls > Manage "
        "third-party app access: add the app by its OAuth client ID and set it to Trusted.",
        False,
        ("admin_policy_enforced",),
    ),
    # -- the identity provider: any ------------------------------------------------------
    Entry(
        "InvalidGrant",
        _ANY,
        Stage.TOKEN,
        "The identity provider refused the grant: a refresh token, device code or "
        "password that is no longer (or never was) valid.",
        _NEW_CONSENT + " For the password flow check the password. If the standalone "
        "proxy worked until it restarted, the identity provider rotates refresh tokens and "
        "retired the one in the file: run it with --cache-store so the newest one survives "
        "restarts.",
        False,
        ("invalid_grant",),
    ),
    Entry(
        "InvalidClient",
        _ANY,
        Stage.TOKEN,
        "The identity provider refused the client credentials (client ID, secret or certificate).",
        "Check clientId and the client secret (or certificate) against the app registration "
        "at the identity provider; both must come from the same registration.",
        False,
        ("invalid_client", "unauthorized_client"),
    ),
    Entry(
        "IdentityProviderTlsFailed",
        _ANY,
        Stage.TOKEN,
        "The TLS handshake with the token endpoint failed, usually because its certificate "
        "is not trusted (a TLS-inspecting egress proxy, or a private CA).",
        "Add the CA that signs the token endpoint's certificate: ca_file in the proxy "
        "configuration or MAILWARDEN_TOKEN_CA_FILE for the operator; ask the network team "
        "to exempt login.microsoftonline.com / oauth2.googleapis.com from TLS inspection.",
        True,
        ("tls",),
    ),
    Entry(
        "IdentityProviderUnavailable",
        _ANY,
        Stage.TOKEN,
        "The token endpoint could not be reached or answered with a server error or throttling.",
        "Nothing to change if it passes: mailwarden retries. If it lasts, check that the pod "
        "can resolve and reach the token URL (egress NetworkPolicy, HTTPS_PROXY) and the "
        "provider's status page.",
        True,
        (
            "timeout",
            "connection",
            "transport",
            "server_error",
            "temporarily_unavailable",
            "throttled",
            "slow_down",
            "bad_response",
        ),
    ),
    Entry(
        "TokenRequestFailed",
        _ANY,
        Stage.TOKEN,
        "The identity provider refused the token request for a reason not in this catalogue.",
        "Read provider_code and the identity provider's description in the same log line or "
        "condition message; for Microsoft look the AADSTS number up at "
        "https://login.microsoftonline.com/error.",
        False,
    ),
    # -- the mail server: Microsoft 365 ---------------------------------------------------
    Entry(
        "SmtpAuthDisabled",
        _MS,
        Stage.SMTP,
        "Exchange Online refuses SMTP AUTH: it is turned off for the tenant or the mailbox, "
        "or security defaults block it.",
        "Exchange admin center > Settings > Mail flow: clear 'Turn off SMTP AUTH protocol for "
        "your organization', or per mailbox: Set-CASMailbox -Identity <mailbox> "
        "-SmtpClientAuthenticationDisabled $false (Microsoft 365 admin center > Users > "
        "<user> > Mail > Manage email apps > Authenticated SMTP). Security defaults (Entra "
        "admin center > Overview > Properties > Manage security defaults) block SMTP AUTH "
        "whatever these say.",
        False,
        ("535 5.7.139", "SmtpClientAuthentication is disabled"),
    ),
    Entry(
        "SmtpAuthBlockedByPolicy",
        _MS,
        Stage.SMTP,
        "Exchange Online refused SMTP AUTH because of security defaults or a Conditional "
        "Access policy.",
        "Entra admin center > Overview > Properties > Manage security defaults: Disabled "
        "(replace them with Conditional Access policies that exclude this account from "
        "legacy-client blocks), or see Monitoring & health > Sign-in logs for the policy "
        "that applied.",
        False,
        (
            "security defaults policy",
            "did not meet the criteria to be authenticated successfully",
        ),
    ),
    Entry(
        "SmtpAuthUnsuccessful",
        _MS,
        Stage.SMTP,
        "Exchange Online refused the token for this mailbox: the token is for another user "
        "or resource, lacks SMTP.Send / SMTP.SendAsApp, or the app is not granted the "
        "mailbox.",
        "Delegated: the scope must be https://outlook.office.com/SMTP.Send (not Microsoft "
        "Graph's SMTP.Send) and the login name the signed-in user's mailbox. " + _APP_ONLY_MAILBOX,
        False,
        ("535 5.7.3",),
    ),
    Entry(
        "MailboxNotGrantedToApp",
        _MS,
        Stage.SMTP,
        "Exchange Online accepted the token but could not open the mailbox: the "
        "client-credentials app has no service principal in Exchange or no permission on "
        "this mailbox.",
        _APP_ONLY_MAILBOX,
        False,
        ("430 4.2.0 STOREDRV", "STOREDRV; mailbox logon failure", "mailbox logon failure"),
    ),
    Entry(
        "NotAuthenticatedToSend",
        _MS,
        Stage.SMTP,
        "The server received mail from a session that had not logged in.",
        "Configure the application to log in (SMTP AUTH) to mailwarden with MAIL_USERNAME "
        "and MAIL_PASSWORD, and look for an earlier login failure in the proxy log for the "
        "reason its login failed.",
        False,
        ("530 5.7.57",),
    ),
    Entry(
        "AuthenticatedButNotConnected",
        _MS,
        Stage.IMAP,
        "Exchange Online accepted the token but the mailbox cannot be opened with it: the "
        "token's user is not the mailbox, or the app is not granted the mailbox.",
        _DELEGATED_USER + " " + _APP_ONLY_MAILBOX,
        False,
        ("User is authenticated but not connected",),
    ),
    Entry(
        "Throttled",
        _MS,
        Stage.IMAP,
        "Exchange Online throttles this mailbox and asked to wait before the next login.",
        "Nothing to change for a single burst: mailwarden answers NO [UNAVAILABLE] without "
        "contacting the server until the suggested backoff time has passed. If it recurs, "
        "lower the application's number of simultaneous connections (Exchange allows 20 "
        "IMAP connections per mailbox) or its polling frequency.",
        True,
        ("Request is throttled",),
    ),
    Entry(
        "ImapAuthenticateFailed",
        _MS,
        Stage.IMAP,
        "Exchange Online refused the IMAP login: the token lacks IMAP.AccessAsUser.All / "
        "IMAP.AccessAsApp, is for another user, or IMAP is disabled for the mailbox.",
        "Check the scope (https://outlook.office.com/IMAP.AccessAsUser.All delegated, "
        "https://outlook.office365.com/.default with IMAP.AccessAsApp app-only) and that IMAP "
        "is on: Set-CASMailbox -Identity <mailbox> -ImapEnabled $true. " + _APP_ONLY_MAILBOX,
        False,
        ("AUTHENTICATE failed",),
    ),
    Entry(
        "Pop3LogonFailure",
        _MS,
        Stage.POP3,
        "Exchange Online refused the POP3 login: the token lacks POP.AccessAsUser.All / "
        "POP.AccessAsApp, is for another user, or POP is disabled for the mailbox.",
        "Check the scope (https://outlook.office.com/POP.AccessAsUser.All delegated, "
        "POP.AccessAsApp app-only) and that POP is on: Set-CASMailbox -Identity <mailbox> "
        "-PopEnabled $true. " + _APP_ONLY_MAILBOX,
        False,
        ("unknown user name or bad password",),
    ),
    # -- the mail server: Google ---------------------------------------------------------
    Entry(
        "GoogleTokenNotForUser",
        _GOOGLE,
        Stage.MAIL,
        "Gmail refused the token for this login (error challenge status 400): it was "
        "issued for another user or without the scope https://mail.google.com/.",
        "Request the scope https://mail.google.com/ (gmail.send or gmail.readonly are not "
        "enough for SMTP/IMAP) and log in as the user the token is for: with a service "
        "account that is the delegated user (username), never the service account itself.",
        False,
        ('"status":"400"',),
    ),
    Entry(
        "ServiceAccountAddressAsUsername",
        _GOOGLE,
        Stage.MAIL,
        "The login name is the service account's address; a service account has no mailbox.",
        "Set username to the Workspace user whose mailbox is used; the service account "
        "acts for that user through domain-wide delegation (Google Admin console > Security "
        "> API controls > Manage Domain Wide Delegation).",
        False,
        ("gserviceaccount.com",),
    ),
    Entry(
        "SmtpLineTooLong",
        _GOOGLE,
        Stage.SMTP,
        "The SMTP server refused a command line as too long: the token was sent inline with "
        "AUTH (Gmail limits lines to 512 octets) or by something between the proxy and the "
        "server.",
        "mailwarden sends the token after the 334 challenge; if this still shows, check "
        "for an SMTP-rewriting proxy or firewall on the way, and that the application "
        "talks to mailwarden, not to the server directly.",
        False,
        ("555 5.5.2",),
    ),
    Entry(
        "GmailProtocolDisabled",
        _GOOGLE,
        Stage.MAIL,
        "IMAP or POP is switched off for this Gmail account.",
        "Google Admin console > Apps > Google Workspace > Gmail > End User Access: enable "
        "POP and IMAP access; the user then enables it in Gmail > Settings > Forwarding and "
        "POP/IMAP.",
        False,
        ("not enabled for IMAP use", "not enabled for POP access"),
    ),
    Entry(
        "GoogleLoginRateLimited",
        _GOOGLE,
        Stage.MAIL,
        "Gmail limits logins for this account after too many attempts.",
        "Wait (minutes to an hour) and reduce the application's reconnects; mailwarden "
        "keeps no extra connections of its own.",
        True,
        ("Too many login attempts",),
    ),
    # -- the mail server: any ------------------------------------------------------------
    Entry(
        "TokenRejected",
        _ANY,
        Stage.MAIL,
        "The mail server refused the token as invalid or expired (error challenge status "
        "401 or invalid_token), also after the one retry with a fresh token.",
        "Check that the token is for this mail server: the scopes must name the mail "
        "service (https://outlook.office365.com/..., https://mail.google.com/), not Microsoft "
        "Graph; for a server of your own check its token validation (introspection URL, "
        "username attribute).",
        False,
        ('"status":"401"', '"status":"invalid_token"'),
    ),
    Entry(
        "UpstreamTemporaryFailure",
        _ANY,
        Stage.MAIL,
        "The mail server could not complete the login for now.",
        "Nothing to change if it passes; if it lasts, read provider_code and check the mail "
        "provider's service status.",
        True,
        ("[UNAVAILABLE]", "[SYS/TEMP]", "454 4.7.0"),
    ),
    Entry(
        "UpstreamConnectionLost",
        _ANY,
        Stage.MAIL,
        "The mail server closed the connection or stopped following the protocol during the login.",
        "Usually passing: mailwarden tells the client to try again. If it lasts, check the "
        "upstream host and port (a server of another protocol answers garbage) and the "
        "provider's service status.",
        True,
        ("upstream closed the connection", "upstream protocol error", "upstream said BYE"),
    ),
    Entry(
        "UpstreamRejectedToken",
        _ANY,
        Stage.MAIL,
        "The mail server refused the login for a reason not in this catalogue.",
        "Read provider_code (the server's reply) in the same log line; check the scopes, the "
        "login name (the mailbox address) and that the protocol is enabled for the mailbox.",
        False,
    ),
    # -- reaching the mail server --------------------------------------------------------
    Entry(
        "UpstreamHostNotFound",
        _ANY,
        Stage.CONNECT,
        "The mail server's host name does not resolve.",
        "Check the upstream host (outlook.office365.com / smtp.office365.com for Microsoft "
        "365, imap.gmail.com / smtp.gmail.com for Google) and the pod's DNS: kubectl exec "
        "<pod> -- getent hosts <host>.",
        False,
        ("gaierror", "Name or service not known", "nodename nor servname provided"),
    ),
    Entry(
        "UpstreamConnectionRefused",
        _ANY,
        Stage.CONNECT,
        "The mail server's host refused the TCP connection.",
        "Check the port: IMAP 993 (implicit TLS) or 143 (STARTTLS), SMTP 465 (implicit) or "
        "587 (STARTTLS), POP3 995 or 110; and that no egress firewall rejects it.",
        False,
        ("ConnectionRefusedError", "Connection refused"),
    ),
    Entry(
        "UpstreamConnectTimeout",
        _ANY,
        Stage.CONNECT,
        "The mail server did not answer the connection in time.",
        "Check egress from the pod to the host and port (NetworkPolicy, cloud firewall, "
        "port 25/587 blocks by the hosting provider); mailwarden retries on the next login.",
        True,
        ("TimeoutError", "timed out", "Temporary failure in name resolution"),
    ),
    Entry(
        "UpstreamCertificateInvalid",
        _ANY,
        Stage.TLS,
        "The mail server's TLS certificate was not accepted: not signed by a trusted CA, "
        "expired, or not issued for the host name configured.",
        "Use the provider's host name (not an IP address or a CNAME of your own); for a "
        "private CA or a TLS-inspecting proxy set ca_file on the upstream to its CA bundle. "
        "Never switch verification off.",
        False,
        ("CERTIFICATE_VERIFY_FAILED", "Hostname mismatch", "IP address mismatch"),
    ),
    Entry(
        "TlsModeMismatch",
        _ANY,
        Stage.TLS,
        "The TLS handshake failed because the port speaks plaintext first (STARTTLS) while "
        "implicit TLS was configured, or the other way round.",
        "Set the upstream's tls to implicit for ports 993/465/995 and to starttls for 143/587/110.",
        False,
        ("WRONG_VERSION_NUMBER", "wrong version number"),
    ),
    Entry(
        "UpstreamTlsFailed",
        _ANY,
        Stage.TLS,
        "The TLS handshake with the mail server failed.",
        "Check that the host and port speak TLS as configured, and that no middlebox "
        "interferes; provider_code has the TLS library's words.",
        False,
        ("SSLError",),
    ),
    Entry(
        "UpstreamUnreachable",
        _ANY,
        Stage.CONNECT,
        "The connection to the mail server failed.",
        "Check the host and port of the upstream and egress from the pod; provider_code has "
        "the system's words.",
        True,
    ),
    # -- between the application and the proxy -------------------------------------------
    Entry(
        "UnknownLocalUser",
        _ANY,
        Stage.LOCAL,
        "The application logged in with a user name for which no account is configured.",
        "Use the MailAccount's username (MAIL_USERNAME in the injected environment) or an "
        "account's username in the proxy configuration.",
        False,
    ),
    Entry(
        "LocalPasswordRejected",
        _ANY,
        Stage.LOCAL,
        "The application's password is not the account's local password.",
        "Use MAIL_PASSWORD from the Secret <mailaccount>-proxy (operator), or local_password "
        "of the account; for an emailproxy configuration the first password used after a "
        "start is the one kept: restart the proxy to set another.",
        False,
    ),
    Entry(
        "LocalLoginRateLimited",
        _ANY,
        Stage.LOCAL,
        "Too many failed local logins came from this address; further logins from there "
        "are refused unchecked for a while.",
        "Fix the application's MAIL_USERNAME / MAIL_PASSWORD (see LocalPasswordRejected "
        "and UnknownLocalUser in earlier log lines); the limit lifts by itself "
        "(limits.failedLocalLogins).",
        True,
    ),
)

_BY_REASON = {entry.reason: entry for entry in ENTRIES}

_MAIL_STAGES = frozenset({Stage.SMTP, Stage.IMAP, Stage.POP3, Stage.MAIL})
_FALLBACK_TOKEN = _BY_REASON["TokenRequestFailed"]
_FALLBACK_TOKEN_TEMPORARY = _BY_REASON["IdentityProviderUnavailable"]
_FALLBACK_MAIL = _BY_REASON["UpstreamRejectedToken"]
_FALLBACK_MAIL_TEMPORARY = _BY_REASON["UpstreamTemporaryFailure"]
_FALLBACK_CONNECT = _BY_REASON["UpstreamUnreachable"]
_SERVICE_ACCOUNT = _BY_REASON["ServiceAccountAddressAsUsername"]

_AADSTS = re.compile(r"\bAADSTS\d+\b")
_SMTP_CODE = re.compile(r"^\s*([2-5])\d\d(?:[ -]+\d\.\d{1,3}\.\d{1,3})?")
_BASE64 = re.compile(r"[A-Za-z0-9+/]{16,}={0,2}")
_JSON = re.compile(r"\{[^{}]{0,1000}\}")
_CONTINUATION = re.compile(r"(?<![\w.])([2-5]\d\d)-(?=\d\.\d)")
_BACKOFF = re.compile(r"Suggested Backoff Time:\s*(\d{1,9})\s*milliseconds", re.IGNORECASE)
_MAX_CODE = 200


def by_reason(reason: str) -> Entry:
    """The entry with this reason code; KeyError for an unknown one."""
    return _BY_REASON[reason]


def _pattern(match: str) -> re.Pattern[str]:
    return re.compile(rf"(?<!\w){re.escape(match)}(?!\w)", re.IGNORECASE)


def _is_code(stage: Stage, match: str) -> bool:
    """An OAuth error code (`invalid_grant`) or mailwarden's own (`timeout`): compared with
    a token error's code, never searched for in the description, where the word can mean
    anything."""
    return stage is Stage.TOKEN and re.fullmatch(r"[a-z_]+", match) is not None


# (length of the match, pattern, entry) per stage, longest first: the first hit is the best
_PATTERNS: dict[Stage, list[tuple[int, re.Pattern[str], Entry]]] = {}
_CODES: dict[str, Entry] = {}
for _entry in ENTRIES:
    for _match in _entry.matches:
        if _is_code(_entry.stage, _match):
            _CODES[_match] = _entry
        else:
            _PATTERNS.setdefault(_entry.stage, []).append((len(_match), _pattern(_match), _entry))
for _stage_patterns in _PATTERNS.values():
    _stage_patterns.sort(key=lambda item: -item[0])


def _best(text: str, stages: Iterable[Stage]) -> Entry | None:
    """The entry of `stages` whose longest match occurs in `text`."""
    best: tuple[int, Entry] | None = None
    for stage in stages:
        for length, pattern, entry in _PATTERNS.get(stage, ()):
            if best is not None and length <= best[0]:
                break
            if pattern.search(text):
                best = (length, entry)
                break
    return best[1] if best is not None else None


def _is_service_account(username: str) -> bool:
    return any(p.search(username) for _, p, e in _PATTERNS[Stage.MAIL] if e is _SERVICE_ACCOUNT)


def _clip(text: str) -> str:
    return " ".join(text.split())[:_MAX_CODE]


def diagnose_token_error(code: str, description: str, *, username: str = "") -> Diagnosis:
    """The diagnosis of a `TokenError` (its `code` and scrubbed `description`).

    `username` (optional) is the mailbox the token was for: a service account's own
    address there is diagnosed as such whatever the identity provider said.
    """
    aadsts = _AADSTS.search(description)
    provider_code = aadsts.group(0) if aadsts else code
    entry = _best(description, (Stage.TOKEN,)) or _CODES.get(code.lower())
    if entry is None and code.startswith("http_5"):
        entry = _FALLBACK_TOKEN_TEMPORARY
    if username and _is_service_account(username) and not (entry and entry.temporary):
        entry = _SERVICE_ACCOUNT
    return Diagnosis(entry or _FALLBACK_TOKEN, _clip(provider_code))


def _challenge(candidate: str, encoded: bool) -> str | None:
    """The compact JSON of an error challenge (base64 or not), or None if it is none."""
    try:
        if encoded:
            padded = candidate + "=" * (-len(candidate) % 4)
            candidate = base64.b64decode(padded, validate=True).decode()
        payload = json.loads(candidate)
    except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    if not isinstance(payload, dict) or "status" not in payload:
        return None
    return json.dumps(payload, separators=(",", ":"))


def decode_challenges(reply: str) -> str:
    """`reply` with every SASL error challenge in it (base64 or JSON) added in compact JSON
    (`{"status":"400",...}`), so that matches need not care for encoding or spacing."""
    found = [
        decoded
        for pattern, encoded in ((_BASE64, True), (_JSON, False))
        for candidate in pattern.findall(reply)
        if (decoded := _challenge(candidate, encoded)) is not None
    ]
    return " ".join([reply, *found]) if found else reply


def _without_challenges(reply: str) -> str:
    for pattern, encoded in ((_BASE64, True), (_JSON, False)):

        def drop(found: re.Match[str], encoded: bool = encoded) -> str:
            return "" if _challenge(found.group(0), encoded) else found.group(0)

        reply = pattern.sub(drop, reply)
    return reply


def _reply_code(reply: str) -> str:
    """The provider's own code in a reply: `535 5.7.139` for SMTP, otherwise the reply
    itself (IMAP and POP3 have no numbers), plus the error challenge's status if any."""
    status = re.search(r'"status":"([^"]{1,40})"', decode_challenges(reply))
    suffix = f" (challenge status {status.group(1)})" if status else ""
    smtp = _SMTP_CODE.match(reply)
    if smtp:
        return smtp.group(0).strip().replace("-", " ") + suffix
    return _clip(_without_challenges(reply))[:120] + suffix


def _is_success(reply: str) -> bool:
    text = reply.strip()
    smtp = _SMTP_CODE.match(text)
    if smtp:
        return smtp.group(1) in "23"
    return text.upper().startswith(("+OK", "OK ")) or text.upper() == "OK"


def _is_temporary(reply: str) -> bool:
    smtp = _SMTP_CODE.match(reply)
    return bool(smtp and smtp.group(1) == "4")


def diagnose_reply(stage: Stage, reply: str, *, username: str = "") -> Diagnosis | None:
    """The diagnosis of a mail server's refusal at login; None for a success reply.

    `reply` is the server's text as received (`535 5.7.139 …`, `NO AUTHENTICATE failed.`,
    `-ERR …`), optionally with the error challenge that came before it, base64 or decoded.
    Entries of `stage` and of `Stage.MAIL` (any protocol) are considered. `username`
    (optional) is the login name sent upstream.
    """
    # "535-5.7.8 ..." (a line of a multi-line reply) as "535 5.7.8 ..."
    reply = _CONTINUATION.sub(r"\1 ", reply)
    text = decode_challenges(reply)
    if not reply.strip() or (text == reply and _is_success(reply)):
        return None  # a 334 carrying an error challenge is a refusal, not a go-ahead
    entry = _best(text, (stage, Stage.MAIL) if stage in _MAIL_STAGES else (stage,))
    if entry is None:  # a protocol's entries are recognised on any protocol's reply
        entry = _best(text, _MAIL_STAGES - {stage, Stage.MAIL})
    if username and _is_service_account(username) and not (entry and entry.temporary):
        entry = _SERVICE_ACCOUNT
    if entry is None:
        entry = _FALLBACK_MAIL_TEMPORARY if _is_temporary(reply) else _FALLBACK_MAIL
    return Diagnosis(entry, _clip(_reply_code(reply)))


def diagnose_connection(error: BaseException) -> Diagnosis:
    """The diagnosis of a failure to connect to the mail server or to secure the
    connection (DNS, TCP, TLS), from the exception the socket layer raised."""
    text = f"{type(error).__name__}: {error}"
    for klass in type(error).__mro__:  # ssl.SSLCertVerificationError is an SSLError
        text += f" {klass.__name__}"
    entry = _best(text, (Stage.TLS, Stage.CONNECT)) or _FALLBACK_CONNECT
    reason = getattr(error, "reason", None)
    code = reason if isinstance(reason, str) else type(error).__name__
    return Diagnosis(entry, _clip(code))


def backoff_seconds(reply: str) -> float | None:
    """The wait a throttling reply asks for (`Suggested Backoff Time: N milliseconds`)."""
    found = _BACKOFF.search(reply)
    return int(found.group(1)) / 1000 if found else None
