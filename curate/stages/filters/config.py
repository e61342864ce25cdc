"""Settings of the filter stage: rule thresholds with per-dataset and per-domain overrides.

Example (pipeline YAML)::

    filter:
      rules:                       # changes for all data
        internvl_repetition: {enabled: true}
      overrides:                   # by dataset name or domain; a dataset beats its domain
        ocr: {duplicate_lines: {threshold: 0.6}}
        chart_qa: {image_aspect_ratio: {severity: reject}}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from curate.stages.filters.registry import DOMAIN_THRESHOLDS, RULES, RULES_BY_NAME


class RuleSetting(BaseModel):
    """A change to one rule; what is left out keeps its default."""

    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(None, description="fail above (or below) this value")
    severity: Literal["reject", "flag"] | None = Field(
        None, description="reject removes the sample; flag keeps it for review"
    )
    enabled: bool | None = Field(None, description="false turns the rule off")


@dataclass(frozen=True, slots=True)
class ResolvedRule:
    name: str
    metric: str
    op: str
    threshold: float
    severity: str
    enabled: bool


def _check_rules(rules: dict[str, RuleSetting]) -> dict[str, RuleSetting]:
    unknown = sorted(set(rules) - set(RULES_BY_NAME))
    if unknown:
        raise ValueError(f"unknown rule(s) {unknown}; rules are: {', '.join(RULES_BY_NAME)}")
    return rules


class FilterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: dict[str, RuleSetting] = Field(
        default_factory=dict, description="changes to rule defaults, for all data"
    )
    overrides: dict[str, dict[str, RuleSetting]] = Field(
        default_factory=dict, description="changes per dataset name or domain (dataset wins)"
    )
    decode_images: bool = Field(True, description="decode pixels: unreadable and blank images")
    min_lines: int = Field(
        4, ge=2, description="duplicate_lines looks at answers of >= content lines"
    )
    min_line_chars: int = Field(
        10, ge=1, description="duplicate_lines counts repeated lines of >= content characters"
    )
    min_paragraphs: int = Field(
        3, ge=2, description="duplicate_paragraphs: answers of >= paragraphs"
    )
    repetition_min_chars: int = Field(
        64, ge=1, description="char_repetition looks at answers of >= content characters"
    )
    tail_loop_min_chars: int = Field(40, ge=1, description="a tail loop covers >= characters")
    repeated_turn_min_chars: int = Field(
        20, ge=1, description="answers shorter than this may repeat within a conversation"
    )
    batch_rows: int = Field(1024, ge=1, description="samples measured together (vectorised)")
    workers: int | None = Field(
        None, ge=1, description="processes over shards (default: all cores)"
    )

    @field_validator("rules")
    @classmethod
    def _known_rules(cls, v: dict[str, RuleSetting]) -> dict[str, RuleSetting]:
        return _check_rules(v)

    @field_validator("overrides")
    @classmethod
    def _known_override_rules(cls, v: dict[str, dict[str, RuleSetting]]):
        for rules in v.values():
            _check_rules(rules)
        return v

    def resolve(self, dataset: str, domain: str | None) -> dict[str, ResolvedRule]:
        """Every rule's settings for one dataset: defaults < built-in domain thresholds
        (``DOMAIN_THRESHOLDS``) < rules < domain < dataset."""
        layers = [self.rules, self.overrides.get(domain or "", {}), self.overrides.get(dataset, {})]
        out = {}
        builtin = DOMAIN_THRESHOLDS.get(domain or "", {})
        for rule in RULES:
            threshold = builtin.get(rule.name, rule.threshold)
            severity, enabled = rule.severity, rule.enabled
            for layer in layers:
                s = layer.get(rule.name)
                if s is None:
                    continue
                threshold = threshold if s.threshold is None else s.threshold
                severity = severity if s.severity is None else s.severity
                enabled = enabled if s.enabled is None else s.enabled
            out[rule.name] = ResolvedRule(
                rule.name, rule.metric, rule.op, float(threshold), severity, enabled
            )
        return out
