"""REP-003's non-localisable packages: which variants bake leaves at their store path.

rez decides itself whether a package's payload may be copied out of its
repository into its package cache: `Package.is_cachable` reads the
package's `cachable` attribute, then the `default_cachable_per_repository`
(by the repository's location), `default_cachable_per_package` and
`default_cachable` settings, and lacking all of those, the package's
relocatability (`relocatable`, then `default_relocatable_per_repository`,
`default_relocatable_per_package`, `default_relocatable`). Baking moves a
variant from the store's path to the mount's as rez's cache moves it to a
copy, so bake asks rez that same question (rxt.context_variants), with one
difference: rez ships `default_cachable = False`, which makes its own
package cache opt-in. Whoever bakes has opted into rez-lazyfs, so that
shipped value reads as unset (rez's None: the package's relocatability)
unless the rez configuration sets it (a config file, $REZ_DEFAULT_CACHABLE).

bake asks on a private replica of the definitions (context._variant_roots):
the per-repository settings are looked up by the locations the package
really has (the store's, as rez canonicalises it, then the mount's), as rez
looks them up, and applied to the replica's location.
"""
from __future__ import annotations

import contextlib
import os

# rez's per-repository settings, keyed by a repository's location.
PER_REPOSITORY = ("default_cachable_per_repository", "default_relocatable_per_repository")


@contextlib.contextmanager
def as_from_their_repositories(locations: dict[str, list[str]]):
    """While inside, rez answers is_cachable for a package loaded from each
    key of *locations* (a replica's repository location) as it would where
    the package really is (the first of its values that a per-repository
    setting names), and reads its shipped default_cachable as unset."""
    from rez.config import config
    from rez.exceptions import RezError

    from .errors import UserError

    overrides = {}
    try:
        for key in PER_REPOSITORY:
            setting = config.get(key)
            if setting:
                overrides[key] = {**setting, **{
                    replica: next(setting[real] for real in reals if real in setting)
                    for replica, reals in locations.items() if any(r in setting for r in reals)}}
        if not configured("default_cachable"):
            overrides["default_cachable"] = None
    except RezError as e:
        raise UserError(f"rez's configuration: {e}") from None
    before = {key: config.overrides[key] for key in overrides if key in config.overrides}
    for key, value in overrides.items():
        config.override(key, value)
    try:
        yield
    finally:
        for key in overrides:
            if key in before:
                config.override(key, before[key])
            else:
                config.remove_override(key)


def configured(key: str) -> bool:
    """Whether rez's configuration sets *key* (a config file besides rez's
    own, an environment variable or an override), rather than rez's
    shipped rezconfig alone."""
    from rez.config import Config, config, get_module_root_config

    variable = f"REZ_{key.upper()}"
    if key in config.overrides or any(v in os.environ for v in (variable, variable + "_JSON")):
        return True
    studio = Config([p for p in config.filepaths if p != get_module_root_config()], locked=True)
    return key in studio.data
