import pytest


@pytest.fixture(scope="session")
def executed_dir(tmp_path_factory):
    """Where test_notebooks leaves each executed notebook, so that the site test reuses them."""
    return tmp_path_factory.getbasetemp() / "executed_notebooks"
