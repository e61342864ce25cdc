"""Help text of a stage command, generated from its section's config model (one source)."""

from __future__ import annotations

from pydantic import BaseModel


def _models() -> dict[str, type[BaseModel]]:
    from curate.pipeline.config import StagesConfig

    out = {}
    for name, field in StagesConfig.model_fields.items():
        # `X | None` sections: the model is the non-None member of the union.
        for arg in getattr(field.annotation, "__args__", (field.annotation,)):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                out[name] = arg
    return out


def section_help(section: str) -> str:
    """``--set`` keys of ``stages.<section>``: name, default and description of each field."""
    model = _models()[section]
    lines = [f"Settings (stages.{section} of the pipeline file; change with --set KEY=VALUE):"]
    for name, field in model.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = (
            ""
            if default is None or isinstance(default, dict | list) and not default
            else (f" [default: {default}]")
        )
        lines.append(f"  {name}: {field.description or ''}{shown}")
    # Typer's rich help joins epilog lines unless they are separate paragraphs.
    return "\n\n".join(lines)
