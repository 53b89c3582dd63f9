"""What people read and look at: run folders, plots and pages. One module per job:

- `fit_run`: a fit's run folder (head, metrics.json, report.md, plots, report.html);
- `experiment`: an experiment's folder (results.csv, summary.md, plots);
- `inspection`: what is found in a cache's features (leaks, duplicates, suspect labels, a map);
- `plots`: the PNG plots; `pages`: report.html and inspect.html (rendering only).
"""
