"""Findings and the verdict built from them.

Level: ``incompatible`` when any finding is an error, ``partial`` when any is a warning, else ``full``.
Score: ``0.5 ** errors * 0.9 ** warnings`` (info findings cost nothing), so a clean adapter scores 1.0,
every warning costs 10 % and any error puts the score at 0.5 or below.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


class Level(StrEnum):
    FULL = "full"
    PARTIAL = "partial"
    INCOMPATIBLE = "incompatible"


@dataclass(frozen=True)
class Issue:
    """One finding: what is wrong (or worth knowing), in which category, and how to fix it."""

    severity: Severity
    category: str
    message: str
    hint: str = ""
    check: str = ""


@dataclass
class ValidationReport:
    adapter_dir: str
    base_model: str
    peft_type: str | None = None
    issues: list[Issue] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def count(self, severity: Severity) -> int:
        return sum(1 for issue in self.issues if issue.severity == severity)

    @property
    def compatibility_level(self) -> Level:
        if self.count(Severity.ERROR):
            return Level.INCOMPATIBLE
        return Level.PARTIAL if self.count(Severity.WARNING) else Level.FULL

    @property
    def overall_score(self) -> float:
        return round(0.5 ** self.count(Severity.ERROR) * 0.9 ** self.count(Severity.WARNING), 4)

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter_dir": self.adapter_dir,
            "base_model": self.base_model,
            "peft_type": self.peft_type,
            "compatibility_level": str(self.compatibility_level),
            "overall_score": self.overall_score,
            "issues": [{k: str(v) for k, v in asdict(issue).items()} for issue in self.issues],
            "facts": self.facts,
        }

    def render(self) -> str:
        """A readable report: verdict, findings by severity, then the facts gathered."""
        lines = [
            f"adapter     {self.adapter_dir}",
            f"base model  {self.base_model}",
            f"peft type   {self.peft_type or 'unknown'}",
            f"verdict     {self.compatibility_level.upper()} (score {self.overall_score:.2f}: "
            f"{self.count(Severity.ERROR)} errors, {self.count(Severity.WARNING)} warnings)",
            "",
        ]
        for severity in Severity:
            for issue in (i for i in self.issues if i.severity == severity):
                lines.append(f"{severity.upper():<8} [{issue.category}] {issue.message}")
                if issue.hint:
                    lines.append(f"{'':<9}fix: {issue.hint}")
        if not self.issues:
            lines.append("no findings")
        if self.facts:
            lines.append("")
            for key, value in self.facts.items():
                if key == "files":
                    lines.append("files")
                    lines.extend(
                        f"  {name:<28}{f['bytes']:>12,} bytes  sha256 {f['sha256']}" for name, f in value.items()
                    )
                else:
                    lines.append(f"{key:<22}{value}")
        return "\n".join(lines)
