pytest_plugins = [
    "tests.fixtures.secrets_scan",  # first: other fixtures import it
    "tests.fixtures.kube",
    "tests.fixtures.idp",
    "tests.fixtures.dovecot",
    "tests.fixtures.postfix",
    "tests.fixtures.mailservers",
    "tests.fixtures.proxy",
    "tests.fixtures.operator",
    "tests.fixtures.faulty",
]
