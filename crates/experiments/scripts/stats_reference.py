"""Reference values for tests/stats.rs: SciPy's and statsmodels' answers to
the statistics of src/stats.rs on fixed inputs.

Needs scipy and statsmodels (not in the project's torch venv; a throwaway
venv does):

    python3 -m venv /tmp/statvenv && /tmp/statvenv/bin/pip install scipy statsmodels
    /tmp/statvenv/bin/python crates/experiments/scripts/stats_reference.py

Writes crates/experiments/tests/fixtures/stats_reference.json with:
- `t_cdf`: [t, df, scipy.stats.t.cdf(t, df)];
- `t_quantile`: [p, df, scipy.stats.t.ppf(p, df)];
- `paired_t`: a, b, and scipy.stats.ttest_rel(a, b): statistic, pvalue and
  confidence_interval(0.95);
- `mcnemar`: [b, c, statsmodels mcnemar([[n11, b], [c, n22]], exact=True).pvalue];
- `betainc`: [x, a, b, scipy.special.betainc(a, b, x)].
"""

import json
import os

import numpy as np
import scipy
import statsmodels
from scipy import special, stats
from statsmodels.stats.contingency_tables import mcnemar

out = {
    "versions": {"scipy": scipy.__version__, "statsmodels": statsmodels.__version__},
    "t_cdf": [],
    "t_quantile": [],
    "paired_t": [],
    "mcnemar": [],
    "betainc": [],
}

for df in [1, 2, 3, 4, 5, 9, 30, 200]:
    for t in [-7.5, -2.1, -0.3, 0.0, 0.8, 2.776, 15.0]:
        out["t_cdf"].append([t, df, float(stats.t.cdf(t, df))])
    for p in [0.001, 0.025, 0.3, 0.5, 0.9, 0.975, 0.995]:
        out["t_quantile"].append([p, df, float(stats.t.ppf(p, df))])

rng = np.random.default_rng(2024)
for n in [2, 3, 5, 8, 20]:
    for shift in [0.0, 0.4, 1.5]:
        a = rng.normal(80.0, 2.0, n)
        b = a - shift + rng.normal(0.0, 1.0, n)
        r = stats.ttest_rel(a, b)
        ci = r.confidence_interval(0.95)
        out["paired_t"].append(
            {
                "a": a.tolist(),
                "b": b.tolist(),
                "t": float(r.statistic),
                "p": float(r.pvalue),
                "low": float(ci.low),
                "high": float(ci.high),
            }
        )

for b, c in [(0, 1), (1, 1), (3, 9), (9, 3), (10, 0), (25, 40), (120, 151), (600, 655), (2000, 2100), (7, 30)]:
    table = [[500, b], [c, 400]]
    out["mcnemar"].append([b, c, float(mcnemar(table, exact=True).pvalue)])

for x, a, b in [(0.2, 0.5, 0.5), (0.7, 2.0, 3.0), (0.99, 10.0, 0.5), (0.01, 0.5, 40.0), (0.5, 100.0, 100.0), (0.9, 1.5, 0.5)]:
    out["betainc"].append([x, a, b, float(special.betainc(a, b, x))])

path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "stats_reference.json")
tmp = path + ".tmp"
with open(tmp, "w") as f:
    json.dump(out, f, indent=1)
os.replace(tmp, path)
print("wrote", os.path.normpath(path))
