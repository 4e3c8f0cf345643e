"""The study runner: one pipeline behind every experiment module (docs/architecture.md).

An experiment module declares a `Study` (its arms, tables, claims and hooks) and its own run
functions and report sections; `main(STUDY, argv)` does the rest: typed configuration built
once at the CLI edge (`flags`, `config`), k-shot and tuning draws and CV folds (`draws`),
tuning and evaluation points per cell and arm (`grid`), the resumable run loop (`runner`),
one record schema with a reader of published records (`records`), the report skeleton
(`report`) and publishing (`publish`).
"""
from jtransfer.study.config import Cells, Config, Output, Protocol, Source, flag
from jtransfer.study.declare import Arm, RunContext, Study, Table
from jtransfer.study.edge import main, publisher, script

__all__ = ["Arm", "Cells", "Config", "Output", "Protocol", "RunContext", "Source", "Study",
           "Table", "flag", "main", "publisher", "script"]
