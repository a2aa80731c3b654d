"""esq-report: tables and figures from finished runs (report.py), the robustness-compression curve (curves.py)."""
