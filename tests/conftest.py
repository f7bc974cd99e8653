import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def poisoned_outputs():
    """Fill every torch.empty with NaN, so an output element a kernel forgets to write shows up."""
    previous = torch.utils.deterministic.fill_uninitialized_memory
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = previous
    torch.use_deterministic_algorithms(was_deterministic)


# Hypothesis profiles of the property tests (tests/test_properties.py): "ci" (the default:
# few examples, derandomized so CI is reproducible) and "long" for local runs. Pick one with
# HYPOTHESIS_PROFILE=long or pytest's --hypothesis-profile=long.
import os  # noqa: E402

from hypothesis import HealthCheck, settings  # noqa: E402

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_QUIET)
settings.register_profile("long", max_examples=400, deadline=None, suppress_health_check=_QUIET)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
