"""The multi-worker tests reuse the search tests' tiny models and task set, and need a PostgreSQL server."""

import os

import pytest



@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The server of ``MERGEOPT_TEST_POSTGRES`` (``export MERGEOPT_TEST_POSTGRES=$(bash .ci/postgres.sh)``)."""
    url = os.environ.get("MERGEOPT_TEST_POSTGRES")
    if url:
        return url
    reason = ("MERGEOPT_TEST_POSTGRES is unset: these tests need a PostgreSQL server; start one with "
              "export MERGEOPT_TEST_POSTGRES=$(bash .ci/postgres.sh)")
    if os.environ.get("MERGEOPT_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"MERGEOPT_REQUIRE_POSTGRES=1 but {reason}")
    pytest.skip(reason)
