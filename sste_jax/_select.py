"""One selector vocabulary: rules ``{regex: SparsityConfig}`` on ``"a/b/c"`` paths, first full match wins.

`FEED_FORWARD` is the paper's default choice (the feed-forward linears of transformer blocks), as a
regex that matches both a module path (``h/0/mlp/c_fc``) and a parameter path (``h/0/mlp/c_fc/kernel``).

>>> import sste_jax
>>> rules = check_rules(sste_jax.feed_forward(), "example")
>>> [bool(match_rule(rules, p)) for p in ("h/0/mlp/c_fc", "h/0/attn/c_attn", "layers_3/wi", "fc")]
[True, False, True, False]
"""

import re
from collections.abc import Mapping

from sste_jax._config import SparsityConfig, check_config

__all__ = ["FEED_FORWARD", "feed_forward", "match_rule", "match_weight", "check_rules"]

_CONTAINER = r"[^/]*(?:mlp|ffn|feed_?forward)[^/]*"
_NAME = (
    r"(?:c_)?fc\d*|fc_(?:in|out)|(?:up|down|gate)_proj|w[123]|wi(?:_\d)?|wo|dense_h_to_4h|dense_4h_to_h"
    r"|gating_einsum"
)
_BLOCK = r"\d+|[^/]*_\d+"
FEED_FORWARD = (
    rf"(?i)(?:.*/)?{_CONTAINER}(?:/.+)?"  # a feed-forward module or inside one: layer_0/mlp, blocks/0/mlp/c_proj
    rf"|(?:.*/)?(?:{_BLOCK})/(?:.*/)?(?:{_NAME})(?:/[^/]+)?"  # a feed-forward name inside a block: h_3/wi
)
"""Regex of the feed-forward layers' paths: under a module whose name contains ``mlp``, ``ffn`` or
``feed_forward``, or named ``c_fc``, ``c_proj`` (under ``mlp``), ``fc1``, ``up_proj``, ``gate_proj``,
``down_proj``, ``w1``-``w3``, ``wi``, ``wo``, ``dense_h_to_4h``, ``dense_4h_to_h``, ``gating_einsum``
inside a repeated block (``blocks/0``, ``layers_3``); a parameter name may follow. Gemma's ``linear``
is matched through its ``mlp`` module (a bare ``linear`` name is too common to mean feed-forward)."""

Rules = Mapping[str, SparsityConfig]


def feed_forward(config: SparsityConfig = SparsityConfig()) -> dict[str, SparsityConfig]:
    """The rules ``{FEED_FORWARD: config}``: the feed-forward products of transformer blocks.

    >>> import sste_jax
    >>> rules = sste_jax.feed_forward(sste_jax.SparsityConfig(mvue=True))
    >>> list(rules.values())[0].mvue
    True
    """
    return {FEED_FORWARD: config}


def check_rules(rules: Rules, where: str) -> list[tuple[str, re.Pattern, SparsityConfig]]:
    """``[(pattern, compiled, config)]`` of ``rules``, in order; raises naming a bad regex or config."""
    if not isinstance(rules, Mapping) or not rules:
        raise TypeError(f"{where}: rules must be a non-empty dict {{regex: SparsityConfig}}, got {rules!r}"[:300])
    out = []
    for pattern, config in rules.items():
        if not isinstance(pattern, str):
            raise TypeError(f"{where}: rule keys must be regex strings, got {pattern!r}")
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{where}: rule {pattern!r} is not a valid regex: {e}") from None
        check_config(config, where, f"rules[{pattern!r}]")
        out.append((pattern, compiled, config))
    return out


def match_rule(rules: Rules | list, path: str) -> tuple[str, SparsityConfig] | None:
    """The first rule ``(pattern, config)`` whose regex fully matches ``path``, or None.

    >>> import sste_jax
    >>> rules = {r".*mlp.*": sste_jax.SparsityConfig(method="ste"), r".*": sste_jax.SparsityConfig()}
    >>> match_rule(rules, "h/0/mlp/c_fc")[1].method, match_rule(rules, "h/0/attn")[1].method
    ('ste', 'sste')
    """
    checked = rules if isinstance(rules, list) else check_rules(rules, "match_rule")
    return next(((p, c) for p, compiled, c in checked if compiled.fullmatch(path)), None)


def match_weight(rules: list, path: str) -> tuple[str, SparsityConfig] | None:
    """The first rule ``(pattern, config)`` that fully matches weight ``path`` (``"h/0/mlp/c_fc/kernel"``) or
    the path of the module holding it (``"h/0/mlp/c_fc"``), or None.

    >>> import sste_jax
    >>> from sste_jax._select import check_rules
    >>> rules = check_rules({"h/0/mlp/c_fc": sste_jax.SparsityConfig()}, "example")
    >>> match_weight(rules, "h/0/mlp/c_fc/kernel")[0], match_weight(rules, "h/0/mlp/c_fc/bias/x")
    ('h/0/mlp/c_fc', None)
    """
    module = path.rpartition("/")[0]
    return next(((p, c) for p, compiled, c in rules if compiled.fullmatch(path) or compiled.fullmatch(module)), None)
