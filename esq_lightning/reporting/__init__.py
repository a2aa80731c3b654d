"""esq-report: tables and figures from finished runs (report.py collects and writes them; tables.py the data,
formats.py Markdown / LaTeX / CSV, curves.py the robustness-compression curve)."""
