"""The training bar's text (``uda-ray train``): which losses it shows and how. Presentation
only (:data:`uda_ray.fingerprint.NOT_TRAINING`): a change here retrains no stage."""

from __future__ import annotations

BAR_LOSSES = 4        # at most this many losses on the training bar (MLflow gets all of them)
_BAR_MIN = 10         # characters the bar itself keeps
_BAR_COLS = 120       # the width assumed where the output is not a terminal (a log file)
# A loss's name on the bar: the domain (src/tgt) and "main" dropped, the rest shortened.
_LOSS_WORDS = {"src": "", "tgt": "", "main": "", "disc": "D", "discoverer": "disc", "corrector": "corr"}


def short_loss_name(key: str) -> str:
    """``loss/seg_src`` -> ``seg``, ``loss/adv_tgt_aux`` -> ``adv.aux``, ``loss/disc_main`` -> ``D``."""
    name = key.split("/")[-1]
    return ".".join(w for w in (_LOSS_WORDS.get(w, w) for w in name.split("_")) if w) or name


def loss_postfix(means: dict, ncols: int | None, desc: str, total: int) -> str:
    """The losses on the training bar, ``seg=0.412 seg.aux=0.523 adv=0.00123``: at most
    :data:`BAR_LOSSES` (``loss/total`` first, then the method's order), short names, and only
    those that fit beside the bar's own text in ``ncols`` columns with a bar of at least
    ``_BAR_MIN`` characters; the rest are dropped whole, never cut mid-name."""
    losses = sorted((k for k in means if k.startswith("loss/")), key=lambda k: k != "loss/total")
    short = [short_loss_name(k) for k in losses]
    names = [s if short.count(s) == 1 else k.split("/")[-1] for s, k in zip(short, losses)]
    return fit_postfix(" ".join(f"{n}={means[k]:.3g}" for n, k in zip(names[:BAR_LOSSES], losses)), ncols, desc,
                       total)


def fit_postfix(text: str, ncols: int | None, desc: str, total: int) -> str:
    """``text``'s space-separated items, the last ones dropped whole until it fits beside the
    bar (e.g. again when the bar's description grows to ``RUN (evaluating)``)."""
    # tqdm's text around the bar: "DESC: 100%|", "| N/TOTAL [H:MM:SS<H:MM:SS, 12.34it/s, " and "]"
    room = (ncols or _BAR_COLS) - (len(desc) + 2 * len(str(total)) + 45 + _BAR_MIN)
    items = text.split()
    while items and len(" ".join(items)) > room:
        items.pop()
    return " ".join(items)

