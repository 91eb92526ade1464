"""The progress bar of the commands that answer many questions (``caption``, ``evaluate``)."""

import sys

from tqdm import tqdm


def progress_bar(total: int, done: int, unit: str) -> tqdm:
    """A bar on stderr for ``total`` items, ``done`` of them before this run; see ``advance``."""
    return tqdm(
        total=total,
        initial=done,
        unit=unit,
        file=sys.stderr,
        dynamic_ncols=True,
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
    )


def advance(bar: tqdm, note: str = "") -> None:
    """One more item done: the bar shows the items per minute of this run, then ``note``."""
    elapsed = bar.format_dict["elapsed"]
    rate = f"{(bar.n + 1 - bar.initial) * 60 / elapsed:.1f} {bar.unit}s/min" if elapsed > 0 else ""
    bar.set_postfix_str(", ".join(part for part in (rate, note) if part), refresh=False)
    bar.update()
