"""Studies: data sets x variants x seeds under one protocol -> records -> tables, plots, pages."""

from recforge.study.engine import plan, run_study
from recforge.study.spec import StudySpec, load_spec

__all__ = ["StudySpec", "load_spec", "plan", "run_study"]
