"""Portable exports of a run: the exemplar ledger of a CAFE stage as Parquet (:func:`export_ledger`) and a
static, self-contained HTML atlas of a run (:func:`export_html`)."""

from .html_atlas import DEFAULT_MAX_BYTES, export_html
from .ledger import export_ledger, export_run_ledgers, ledger_table

__all__ = ["DEFAULT_MAX_BYTES", "export_html", "export_ledger", "export_run_ledgers", "ledger_table"]
