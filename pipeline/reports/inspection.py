"""Looking at the data through its cached features: leaks across splits, duplicates, suspect labels,
a 2-D map and the class balance. Everything is computed from the cache (and a fitted head where
there is one); image files are opened only to compare the bytes of near-identical pairs.

`inspect(cache)` gathers it all for `transfer inspect`, `inspect_fit(result)` the same sections for a
fit's report.html; `pages` turns them into a page.

Suspect labels have one definition (`label_issues`), which both call: the train+val rows of the
cache (as `fit` splits it), out-of-fold probabilities of stratified 5-fold cross-validation of the
head at one C (fit's: chosen by fit's protocol, or given), and cleanlab's confident-learning rule.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from numbers import Integral, Real

import numpy as np

from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler

from ..cache import Cache, read_cache
from ..errors import SettingError, TransferError
from ..files import display_path
from ..fitting.splits import make_splits
from ..progress import resolve
from ..settings import Interval, NoneMeans, validate

# Cosine similarity of mean-centred features above which two images count as the same picture
# (a copy, a re-encode, a resize): measured on the real photos, see benchmarks/inspect_threshold.py.
LEAK_THRESHOLD = 0.80
BLOCK_ROWS = 2048  # rows per block of the similarity search: a block of sims is BLOCK_ROWS^2 floats
EXACT_SEARCH_LIMIT = 1e12  # query x reference x dim multiply-adds searched exactly (~55 s at the 18 GMAC/s measured here); faiss HNSW beyond
SUSPECT_FOLDS = 5
LEAK_SEARCH_LIMIT = 1e12  # query x reference x dim beyond which a fit's report skips the leak search
SUSPECT_ROWS = 20_000  # at most this many labelled rows cross-validated for a fit's suspect labels


@dataclass
class Pair:
    """Two near-identical images: rows a and b of the cache, their cosine similarity, and whether
    their files hold the same bytes (None when a file could not be read)."""

    a: int
    b: int
    similarity: float
    same_bytes: bool | None = None


@dataclass
class Suspect:
    """A labelled image whose given label looks wrong: its out-of-fold probability is below its
    class's threshold and another class's is above that class's own (`confident_issues`)."""

    row: int
    given: int
    given_probability: float
    preferred: int  # the class suggested instead: the most probable of those above their thresholds
    preferred_probability: float
    threshold: float = 0.0  # the given class's threshold: its images' mean out-of-fold self-confidence
    margin: float = 0.0  # p(given) - the largest other probability: the ranking (most negative first)


@dataclass
class Inspection:
    """What `inspect` found in one cache."""

    cache: Cache
    threshold: float
    leaks: list[Pair]  # train image (a) vs val/test image (b)
    duplicates: list[Pair]  # byte-identical files anywhere in the cache
    suspects: list[Suspect]  # every suspect label, most negative margin first (label_issues.csv)
    balance: dict[str, list[int]]  # split (or "all") -> images per class
    map_rows: np.ndarray  # (M,) rows shown on the map
    map_xy: np.ndarray  # (M, 2) their first two principal components
    notes: list[str] = field(default_factory=list)
    out: str | None = None  # the folder written (inspect.html, map.png), if any
    warnings: list[str] = field(default_factory=list)  # e.g. images that could not be opened for thumbnails
    without_leaks: dict | None = None  # a fit's test top-1 without its leaked rows: n, removed, top1
    suspect_method: str = ""  # how the suspects were found, in words: which rows, C, folds and rule
    top: int = 24  # suspects shown on the page (all of them are in label_issues.csv)

    def lines(self) -> list[str]:
        """What was found, in a few lines for the user."""
        same = sum(bool(p.same_bytes) for p in self.leaks)
        lines = [f"{self.cache.n} images, {len(self.cache.classes)} classes",
                 f"leaks across splits: {len(self.leaks)} near-identical pairs ({same} byte-identical)",
                 f"duplicate files: {len(self.duplicates)} byte-identical pairs",
                 f"suspect labels: {len(self.suspects)} ({self.suspect_method})"]
        if self.out:
            lines.append(f"written: {display_path(self.out)}/inspect.html (open it in a browser), "
                         f"{display_path(self.out)}/label_issues.csv, {display_path(self.out)}/map.png")
        return lines

    def leaked_rows(self) -> set[int]:
        """Val/test rows with a near-identical train image."""
        return {p.b for p in self.leaks}


def _unit(X: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """(b, D) rows -> (b, D + 1): X - mean scaled to norm 1, and a last column that is 1 only for a
    row equal to the mean, whose centred vector is zero. So identical rows always have cosine 1 -
    duplicates by definition - even when every row is the same (all centred vectors zero)."""
    Z = X - mean
    norms = np.linalg.norm(Z, axis=1, keepdims=True)
    at_mean = norms <= 1e-7 * float(np.linalg.norm(mean)) + np.finfo(np.float32).tiny
    Z = np.where(at_mean, 0, Z / np.maximum(norms, 1e-12))
    return np.concatenate([Z, at_mean.astype(Z.dtype)], axis=1)


def similar_pairs(cache: Cache, queries: np.ndarray, references: np.ndarray, threshold: float,
                  mean: np.ndarray | None = None, same_set: bool = False) -> list[Pair]:
    """Pairs (reference a, query b) whose centred features have cosine >= threshold, searched in
    blocks (memory O(BLOCK_ROWS x (D + BLOCK_ROWS))). same_set: queries == references (and sorted),
    each pair once."""
    if len(queries) == 0 or len(references) == 0:
        return []
    mean = cache_mean(cache) if mean is None else mean
    if len(queries) * len(references) * cache.dim > EXACT_SEARCH_LIMIT and _faiss() is not None:
        return _faiss_pairs(cache, queries, references, threshold, mean, same_set)
    pairs = []
    for qi, (q_idx, Q) in enumerate(cache.blocks(queries, BLOCK_ROWS, np.float32)):
        Q = _unit(Q, mean)
        for ri, (r_idx, R) in enumerate(cache.blocks(references, BLOCK_ROWS, np.float32)):
            if same_set and ri < qi:
                continue  # the same block pair, seen the other way round
            sims = Q @ _unit(R, mean).T
            for i, j in zip(*np.nonzero(sims >= threshold)):
                a, b = int(references[r_idx[j]]), int(queries[q_idx[i]])
                if same_set:
                    if a == b or (ri == qi and a > b):
                        continue  # itself, or the diagonal block's pair seen the other way round
                    a, b = min(a, b), max(a, b)
                pairs.append(Pair(a, b, float(sims[i, j])))
    return sorted(pairs, key=lambda p: -p.similarity)


def _faiss():
    try:
        import faiss  # optional: the approximate search for sizes where the exact one is slow
    except ImportError:
        return None
    return faiss


def _faiss_pairs(cache: Cache, queries, references, threshold, mean, same_set) -> list[Pair]:
    """The same search through faiss's HNSW index (approximate, for sizes where exact is slow):
    the 10 nearest references of each query, kept when above the threshold."""
    faiss = _faiss()
    index = faiss.IndexHNSWFlat(cache.dim + 1, 32, faiss.METRIC_INNER_PRODUCT)  # _unit's extra column
    index.hnsw.efSearch = 128  # recall over speed: a missed leak is worse than a slower search
    for _, R in cache.blocks(references, BLOCK_ROWS, np.float32):
        index.add(np.ascontiguousarray(_unit(R, mean), dtype=np.float32))
    pairs = []
    for q_idx, Q in cache.blocks(queries, BLOCK_ROWS, np.float32):
        sims, found = index.search(np.ascontiguousarray(_unit(Q, mean), dtype=np.float32), 10)
        for i, j in zip(*np.nonzero((sims >= threshold) & (found >= 0))):
            a, b = int(references[found[i, j]]), int(queries[q_idx[i]])
            if a != b and (not same_set or a < b):
                pairs.append(Pair(a, b, float(sims[i, j])))
    return sorted({(p.a, p.b): p for p in pairs}.values(), key=lambda p: -p.similarity)


def cache_mean(cache: Cache) -> np.ndarray:
    """(D,) mean feature, accumulated block by block in float64."""
    total = np.zeros(cache.dim)
    for _, X in cache.blocks(None, BLOCK_ROWS, np.float32):
        total += X.sum(0, dtype=np.float64)
    return (total / max(cache.n, 1)).astype(np.float32)


def mark_same_bytes(cache: Cache, pairs: list[Pair]) -> None:
    """Set pair.same_bytes by hashing the two files (only the files of the pairs are read)."""
    if not cache.image_dir:
        return  # a write_cache of features made elsewhere: its names point at no folder
    digests: dict[int, str | None] = {}
    for p in pairs:
        for row in (p.a, p.b):
            if row not in digests:
                digests[row] = file_digest(image_path(cache, row))
        if digests[p.a] is not None and digests[p.b] is not None:
            p.same_bytes = digests[p.a] == digests[p.b]


def image_path(cache: Cache, row: int) -> str:
    """The file of `row`, exactly (its bytes joined to the cache's image folder)."""
    return os.fsdecode(os.path.join(os.fsencode(cache.image_dir or ""), cache.path_bytes[row]))


def file_digest(path: str) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def labelled_rows(cache: Cache, seed: int = 0) -> np.ndarray:
    """The train+val rows of the cache as `fit` splits it (seeded): where suspect labels are sought."""
    s = make_splits(cache, seed)
    return np.sort(np.concatenate([s.train, s.val]))


def confident_issues(proba: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cleanlab's confident learning on out-of-fold probabilities (n, K) of given labels y (n,):
    class k's threshold t_k is the mean probability of k over the images labelled k; image i is
    suspect when p_i(y_i) < t_(y_i) and some other class j has p_i(j) >= t_j (cleanlab's 1e-6
    slack). Returns the suspects' positions ranked by margin p_i(y_i) - max_(j != y_i) p_i(j), most
    negative first; the thresholds (K,) (inf for classes without images); the suggested class per
    image (the most probable of the other classes above their thresholds); the margins (n,)."""
    n, k = proba.shape
    at = np.arange(n)
    thresholds = np.full(k, np.inf)
    for c in np.unique(y):
        thresholds[c] = proba[y == c, c].mean()
    confident = proba >= thresholds - 1e-6
    confident[at, y] = False
    given = proba[at, y]
    others = proba.copy()
    others[at, y] = -np.inf
    margin = given - others.max(axis=1)
    suggested = np.where(confident, proba, -np.inf).argmax(axis=1)
    found = np.flatnonzero((given < thresholds[y]) & confident.any(axis=1))
    return found[np.argsort(margin[found], kind="stable")], thresholds, suggested, margin


def out_of_fold(cache: Cache, rows: np.ndarray, C: float, normalize: str = "standard",
                seed: int = 0) -> tuple[np.ndarray, np.ndarray | None, str, list[str]]:
    """Out-of-fold probabilities (n, K) of `rows` (more than SUSPECT_ROWS: that many, evenly
    spaced): stratified k-fold cross-validation (k = 5, fewer when a class has fewer images;
    shuffled with `seed`) of the head at C with this normalization. Returns the rows used, the
    probabilities (None when k < 2), how, in words, and notes."""
    notes = []
    if len(rows) > SUSPECT_ROWS:
        notes.append(f"suspect labels: {SUSPECT_ROWS} of the {len(rows)} train+val images were cross-validated")
        rows = rows[np.linspace(0, len(rows) - 1, SUSPECT_ROWS).round().astype(np.int64)]
    y = cache.labels[rows]
    counts = np.bincount(y, minlength=len(cache.classes))
    folds = int(min(SUSPECT_FOLDS, counts[counts > 0].min())) if len(rows) else 0
    if folds < 2 or (counts > 0).sum() < 2:
        return rows, None, "not computed: cross-validation needs two classes with two images each", notes
    X = cache.features(rows, dtype=np.float64)
    prep = {"standard": [StandardScaler()], "l2": [Normalizer()], "none": []}[normalize]
    model = make_pipeline(*prep, LogisticRegression(C=C, max_iter=1000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        proba = cross_val_predict(model, X, y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                                  method="predict_proba")
    full = np.zeros((len(rows), len(cache.classes)))
    full[:, np.flatnonzero(counts > 0)] = proba  # cross_val_predict's columns are the classes present
    how = (f"stratified {folds}-fold cross-validation (seed {seed}) of the head at C = {C:.4g} ({normalize} "
           f"normalization) over the {len(rows)} train+val images")
    return rows, full, how, notes


def label_issues(cache: Cache, rows: np.ndarray, C: float, normalize: str = "standard",
                 seed: int = 0) -> tuple[list[Suspect], str, list[str]]:
    """Suspect labels among `rows` (fit's train+val rows: `labelled_rows`): `confident_issues` on
    the `out_of_fold` probabilities at C. The one definition `transfer inspect` and a fit's report
    share. Returns the suspects in rank order, the method in words and notes.

    A few lines of scikit-learn rather than cleanlab: the rule is a threshold per class and one
    argsort (benchmarks/label_issues.py compares it with cleanlab's find_label_issues)."""
    rows, proba, how, notes = out_of_fold(cache, rows, C, normalize, seed)
    if proba is None:
        return [], how, notes
    y = cache.labels[rows]
    found, thresholds, suggested, margin = confident_issues(proba, y)
    method = f"cleanlab's confident learning on out-of-fold probabilities: {how}; ranked by margin"
    return [Suspect(int(rows[i]), int(y[i]), float(proba[i, y[i]]), int(suggested[i]), float(proba[i, suggested[i]]),
                    float(thresholds[y[i]]), float(margin[i])) for i in found], method, notes


def auto_C(cache: Cache, seed: int = 0) -> float:
    """The C `transfer fit` chooses on this cache at its defaults (and this seed)."""
    from ..fitting.probe import fit_head  # here: only `inspect` without --C fits a head
    from ..fitting.settings import FitSettings  # (with fit_head)

    return fit_head(cache, FitSettings(seed=seed, calibrate="none")).C


def data_map(cache: Cache, max_points: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(M,) rows and (M, 2) coordinates: the first two principal components of the features
    (at most max_points rows, drawn evenly)."""
    rows = np.arange(cache.n)
    if cache.n > max_points:
        rows = np.unique(np.linspace(0, cache.n - 1, max_points).round().astype(np.int64))
    X = cache.features(rows)
    if len(rows) < 3:
        return rows, np.zeros((len(rows), 2))
    return rows, PCA(2, random_state=seed).fit_transform(X)


def class_balance(cache: Cache) -> dict[str, list[int]]:
    """Images per class, per split (or "all" without splits)."""
    K = len(cache.classes)
    if cache.split is None:
        return {"all": np.bincount(cache.labels, minlength=K).tolist()}
    return {s: np.bincount(cache.labels[cache.split == s], minlength=K).tolist()
            for s in ("train", "val", "test") if (cache.split == s).any()}


def labelled_and_held_out(cache: Cache, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """Train(+val) rows, the rows held out from them (val/test), and how they were told apart."""
    if cache.split is not None and (cache.split != "train").any():
        train = np.flatnonzero(cache.split == "train")
        return train, np.flatnonzero(cache.split != "train"), "train vs val/test"
    s = make_splits(cache, seed)  # no split folders: the same seeded split `fit` makes
    return np.sort(np.concatenate([s.train, s.val])), s.test, f"train+val vs test of fit's split (seed {seed})"


def inspect(data, *, threshold: float = LEAK_THRESHOLD, C: float | None = None, top: int = 24,
            seed: int = 0, progress=None) -> Inspection:
    """Leaks, byte-identical duplicates, suspect labels, a map and the class balance of a cache.

    data: a cache path or a Cache. C: the head cross-validated for suspect labels (None: the C
    `transfer fit` chooses on this cache, so that both list the same suspects). top: how many
    suspects the page shows. progress: one phase per section (pipeline.progress). (`pipeline.inspect`
    also writes inspect.html and label_issues.csv.)
    """
    check_settings(threshold, C, top)
    progress = resolve(progress)
    cache = data if isinstance(data, Cache) else read_cache(data)
    if cache.n == 0:
        raise SettingError(f"{cache.path} holds no images")
    progress.phase("inspect: leaks across splits", 1, "step")
    mean = cache_mean(cache)
    labelled, held_out, how = labelled_and_held_out(cache, seed)
    leaks = similar_pairs(cache, held_out, labelled, threshold, mean)
    progress.advance(1)
    progress.phase("inspect: duplicates", 1, "step")
    everything = np.arange(cache.n)
    candidates = similar_pairs(cache, everything, everything, max(threshold, 0.995), mean, same_set=True)
    mark_same_bytes(cache, leaks + candidates)
    duplicates = [p for p in candidates if p.same_bytes]
    progress.advance(1)
    progress.phase(f"inspect: suspect labels ({SUSPECT_FOLDS}-fold)", 1, "step")
    notes = [f"leaks: {how}, cosine of mean-centred features >= {threshold:g}"]
    suspects, method = [], ""
    try:
        chosen = auto_C(cache, seed) if C is None else C
        suspects, method, more = label_issues(cache, labelled_rows(cache, seed), chosen, seed=seed)
        notes += more
        method += " (C chosen as `transfer fit` chooses it)" if C is None else " (C given)"
    except TransferError as e:  # a cache `fit` refuses (e.g. a class with two images) still gets the rest
        method = f"not computed: {e}"
    progress.advance(1)
    progress.phase("inspect: map", 1, "step")
    rows, xy = data_map(cache, seed=seed)
    progress.advance(1)
    progress.close()
    if any(p.same_bytes is None for p in leaks + candidates):
        notes.append("some image files could not be read, so byte identity is unknown for their pairs")
    return Inspection(cache, threshold, leaks, duplicates, suspects, class_balance(cache), rows, xy, notes,
                      suspect_method=method, top=top)


def check_settings(threshold: float, C: float | None, top: int) -> None:
    validate("threshold", threshold, [Interval(Real, 0, 1, closed="right")], "--threshold")
    validate("C", C, [NoneMeans("auto (None)"), Interval(Real, 0, None, closed="neither")], "--C")
    validate("top", top, [Interval(Integral, 1, None)], "--top")


def inspect_fit(result) -> Inspection:
    """The data sections of a fit's report (a FitResult): leaks between its own train+val and
    evaluated rows, suspect labels under cross-validation of its own head (same C and
    normalization), bounded in cost, and its test top-1 without the leaked rows."""
    cache, notes = result.cache, []
    labelled = np.sort(np.concatenate([result.splits.train, result.splits.val]))
    mean = cache_mean(cache)
    # The held-out rows the scores are on, against the rows the scoring model learned from.
    if result.evaluated_on == "val" and not result.splits.held_out_val:
        held, seen = result.splits.val, result.splits.train
    else:  # the test split (or the held-out val split) against everything fitted on; cv: nothing held out
        held, seen = result.splits.test, labelled
    leaks = []
    if len(held) * len(seen) * cache.dim <= LEAK_SEARCH_LIMIT:
        leaks = similar_pairs(cache, held, seen, LEAK_THRESHOLD, mean)
        mark_same_bytes(cache, leaks)
    else:
        notes.append("leak search skipped: too large for a fit report; run `transfer inspect` on the cache")
    suspects, method, more = label_issues(cache, labelled_rows(cache, result.settings.seed), result.C,
                                          result.settings.normalize, result.settings.seed)
    notes += more
    rows, xy = data_map(cache, seed=result.settings.seed)
    against = ("train vs the held-out val split" if result.splits.held_out_val else
               {"test": "train+val vs test", "val": "train vs val (the split scored)",
                "cv": "nothing held out (scores are cross-validated)"}[result.evaluated_on])
    notes.insert(0, f"leaks: {against}, cosine of mean-centred features >= {LEAK_THRESHOLD:g}")
    if not method.startswith("not computed"):
        method += " (the fit's C and normalization)"
    found = Inspection(cache, LEAK_THRESHOLD, leaks, [], suspects, class_balance(cache), rows, xy, notes,
                       suspect_method=method)
    scored, proba = result.predictions
    leaked = found.leaked_rows()
    clean = np.array([r not in leaked for r in scored])
    if leaked and (result.evaluated_on == "test" or result.splits.held_out_val) and clean.any():
        right = proba.argmax(1) == cache.labels[scored]
        found.without_leaks = {"n": int(clean.sum()), "removed": int((~clean).sum()), "top1": float(right[clean].mean())}
    return found
