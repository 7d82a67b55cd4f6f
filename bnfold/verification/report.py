"""The VerifyReport: per provider and output, the errors, the verdict and the broken fold.

A verdict is ``pass``, ``fail`` or ``not-run``. A provider that could not run is *not run*,
never passed, so the report as a whole passes only when every requested provider ran and
every output of every provider passed; a failure outranks a provider that did not run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from bnfold.verification.compare import OutputStats, _json_float

__all__ = ["Verdict", "ProviderResult", "Localisation", "VerifyReport"]

Verdict = Literal["pass", "fail", "not-run"]


@dataclass
class ProviderResult:
    """What one candidate run on one provider gave.

    Attributes:
        provider: the name as requested (``cpu``, ``cuda``, ...).
        runtime: what ran it (``CPUExecutionProvider``, ``torch:cpu``, ...).
        verdict: pass, fail or not-run.
        outputs: statistics per output (empty when not run).
        reason: why the provider did not run.
    """

    provider: str
    runtime: str
    verdict: Verdict
    outputs: list[OutputStats] = field(default_factory=list)
    reason: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "provider": self.provider,
            "runtime": self.runtime,
            "verdict": self.verdict,
            "reason": self.reason,
            "outputs": [o.to_dict() for o in self.outputs],
        }


@dataclass
class Localisation:
    """The first folded site, in graph order, whose preserved tensor differs.

    Attributes:
        bn: the BN that was folded there (None when no site differs).
        target: the node it was folded into.
        tensor: the value compared.
        max_abs: its largest abs difference.
        max_rel: its largest relative difference.
        checked: how many fold sites were compared.
        note: a sentence on the outcome (e.g. no site differs: the difference is elsewhere).
    """

    bn: str | None
    target: str | None
    tensor: str | None
    max_abs: float | None
    max_rel: float | None
    checked: int
    note: str

    def to_dict(self) -> dict[str, object]:
        return {
            "bn": self.bn,
            "target": self.target,
            "tensor": self.tensor,
            "max_abs": None if self.max_abs is None else _json_float(self.max_abs),
            "max_rel": None if self.max_rel is None else _json_float(self.max_rel),
            "checked": self.checked,
            "note": self.note,
        }


@dataclass
class VerifyReport:
    """The outcome of :func:`bnfold.verify`.

    Attributes:
        reference: a label for the reference model and how it ran.
        candidate: a label for the candidate model.
        providers: one result per requested provider, in request order.
        batches: how many batches were compared.
        seed: the seed of generated inputs (None for real data).
        available_providers: what this onnxruntime build can run.
        localisation: the broken fold, when a FoldReport was given and outputs differ.
        notes: anything else the user should know (e.g. why localisation did not run).
        baseline: a label for the unfolded model whose error is the floor (None: no floor).
        rule: ``floor`` (verdicts against the baseline's error) or ``tolerance`` (fixed).
    """

    reference: str
    candidate: str
    providers: list[ProviderResult]
    batches: int
    seed: int | None
    available_providers: list[str]
    localisation: Localisation | None = None
    notes: list[str] = field(default_factory=list)
    baseline: str | None = None
    rule: str = "tolerance"

    @property
    def exporter_problems(self) -> list[str]:
        """``provider/output`` where the unfolded baseline is itself far off."""
        return [
            f"{p.provider}/{o.output}"
            for p in self.providers
            for o in p.outputs
            if o.floor is not None and o.floor.exporter_problem
        ]

    @property
    def verdict(self) -> Verdict:
        verdicts = [p.verdict for p in self.providers]
        if "fail" in verdicts:
            return "fail"
        if not verdicts or "not-run" in verdicts:
            return "not-run"
        return "pass"

    @property
    def passed(self) -> bool:
        """True only when every requested provider ran and every output passed."""
        return self.verdict == "pass"

    @property
    def not_run(self) -> list[ProviderResult]:
        return [p for p in self.providers if p.verdict == "not-run"]

    def to_dict(self) -> dict[str, object]:
        return {
            "verdict": self.verdict,
            "passed": self.passed,
            "reference": self.reference,
            "candidate": self.candidate,
            "batches": self.batches,
            "seed": self.seed,
            "available_providers": list(self.available_providers),
            "providers": [p.to_dict() for p in self.providers],
            "baseline": self.baseline,
            "rule": self.rule,
            "exporter_problems": self.exporter_problems,
            "localisation": self.localisation.to_dict() if self.localisation else None,
            "notes": list(self.notes),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        parts = [f"verify {self.candidate} against {self.reference}: {self.verdict}"]
        for p in self.providers:
            if p.verdict == "not-run":
                parts.append(f"  {p.provider}: not run ({p.reason})")
                continue
            for o in p.outputs:
                line = (
                    f"  {p.provider} {o.output}: {'pass' if o.passed else 'FAIL'} "
                    f"max_abs={o.max_abs:.3g} max_rel={o.max_rel:.3g} ulp={o.max_ulp:.0f}"
                )
                if o.floor is not None:
                    line += f" floor={o.floor.floor:.3g} factor={o.floor.factor:.3g}"
                parts.append(line)
        if self.localisation and self.localisation.bn:
            parts.append(
                f"  first differing fold: {self.localisation.bn} -> {self.localisation.target}"
            )
        return "\n".join(parts)
