pytest_plugins = [
    "tests.fixtures.kube",
    "tests.fixtures.idp",
    "tests.fixtures.dovecot",
    "tests.fixtures.postfix",
    "tests.fixtures.mailservers",
    "tests.fixtures.proxy",
    "tests.fixtures.operator",
]
