"""The tiny distillation pair (tests/export/conftest.py) for the distillation benchmarks' tests."""

from tests.export.conftest import pair, text_file  # noqa: F401 (fixtures)
