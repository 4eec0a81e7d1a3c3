"""The published report: runs/<sweep>/*/result.json -> reports/<sweep>/index.html plus tidy CSV / Parquet.

tables.py builds the summary and tidy tables (pandas), charts.py the plotly figures, html.py the
self-contained page and reports/index.html, cli.py the ``qbench-report`` entry point.
"""
