"""The Vast.ai side: the REST client, its errors, and how to read an instance."""

from hybrid_provisioner.vast.client import CreateResult, VastClient, is_gone
from hybrid_provisioner.vast.errors import (
    CreateOutcomeUnknown,
    InsufficientCredit,
    OfferUnavailable,
    VastAuthError,
    VastError,
    VastQuotaExceeded,
    VastRateLimited,
    VastUnavailable,
)

__all__ = [
    "CreateOutcomeUnknown",
    "CreateResult",
    "InsufficientCredit",
    "OfferUnavailable",
    "VastAuthError",
    "VastClient",
    "VastError",
    "VastQuotaExceeded",
    "VastRateLimited",
    "VastUnavailable",
    "is_gone",
]
