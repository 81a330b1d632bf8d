"""dermcir: composed vision-language case search for dermoscopy.

A query is a dermoscopic image plus clinical descriptors (the 7-point checklist); the database holds biopsy-confirmed
cases. The model scores ``β Σ_l cos(local) + (1 − β) Σ_l cos(global)`` over three pyramid levels, computed as an
inner product of ``encode_query(image, text)`` and ``encode_target(image)``.

Research use only; dermcir is not a diagnostic device.
"""

__version__ = "0.1.0"
