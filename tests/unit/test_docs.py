"""The reference docs cannot drift from the code: the configuration table is generated
from Settings, and every error code the API or the workers raise is in docs/errors.md."""

from __future__ import annotations

import re
from pathlib import Path

from scripts.settings_reference import reference

ROOT = Path(__file__).resolve().parents[2]

# Where codes are written as literals: ApiError(status, "code"), unavailable("code"),
# JobFailure("code"), and the adapter's typed errors (`code = "..."`).
CODE_PATTERNS = [
    r'ApiError\(\s*\d{3},\s*"([a-z_]+)"',
    r'unavailable\(\s*"([a-z_]+)"',
    r'JobFailure\(\s*"([a-z_]+)"',
    r'^\s+code(?:: str)? = "([a-z_]+)"',
]


def raised_codes() -> set[str]:
    codes: set[str] = set()
    for path in [*ROOT.glob("service/**/*.py"), *ROOT.glob("workers/*.py")]:
        text = path.read_text()
        for pattern in CODE_PATTERNS:
            codes.update(re.findall(pattern, text, flags=re.MULTILINE))
    return codes


def test_configuration_reference_is_current() -> None:
    written = (ROOT / "docs" / "configuration.md").read_text()
    assert written == reference(), (
        "run: python -m scripts.settings_reference > docs/configuration.md"
    )


def test_every_error_code_is_documented() -> None:
    codes = raised_codes()
    assert {"not_found", "no_face", "queue_unavailable", "inference_unavailable"} <= codes
    documented = set(re.findall(r"`([a-z_]+)`", (ROOT / "docs" / "errors.md").read_text()))
    assert not codes - documented, f"add to docs/errors.md: {sorted(codes - documented)}"
