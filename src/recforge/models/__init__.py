"""Models, registered by name. Importing this package registers every model."""

from recforge.models.base import Model, ModelConfig, build_model, register, registered
from recforge.models.coldstart import gme  # noqa: F401
from recforge.models.crossdomain import minet, shared_bottom, unicdr  # noqa: F401
from recforge.models.multimodal import em3  # noqa: F401
from recforge.models.multimodal import freedom  # noqa: F401
from recforge.models.multimodal import em3_freedom  # noqa: F401
from recforge.models.multimodal import qarm  # noqa: F401
from recforge.models.lifelong import search, seminar  # noqa: F401
from recforge.models.multitask import esmm, mmoe  # noqa: F401
from recforge.models.multitask import chorus_cvr, dcmt, escm2  # noqa: F401
from recforge.models.ranking import dcnv2, deepfm, din, dnn, fm, lr  # noqa: F401
from recforge.models.ranking import autoint, pnn, wide_deep  # noqa: F401
from recforge.models.retrieval import two_tower  # noqa: F401
from recforge.models.retrieval import lightgcn  # noqa: F401

__all__ = ["Model", "ModelConfig", "build_model", "register", "registered"]
