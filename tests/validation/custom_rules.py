"""A custom rule as an operator would write one (used by the tests through --rule and the API)."""

from validation import Issue, Severity, ValidationContext


def require_rank_at_most_4(ctx: ValidationContext) -> list[Issue]:
    rank = (ctx.config or {}).get("r")
    if isinstance(rank, int) and rank > 4:
        return [Issue(Severity.WARNING, "policy", f"rank {rank} is above our team's limit of 4", "retrain with r <= 4")]
    return []
