"""Which model configurations a pool serves, and which it could not load (front).

``Pool()`` starts with the models of its repository (all, or ``load_models``) and those
given as ``ModelConfig``; ``Pool.load(name)`` reads one model of the repository again.
Both pass here: the configurations read and checked (files present, versions not
repeated, the pool's default ``execution_timeout`` given to those that set none), and
each model that could not be loaded recorded as failed, for ``Pool.models()`` and for
the requests that name it (the admission reads the same list).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import replace

from ..config import ModelConfig, load_repository
from ..config.repository import load_model
from ..deadlines import check_timeout
from ..errors import ConfigError
from ..info import ModelStatus

__all__ = ["Catalog"]


class Catalog:
    """A pool's source of model configurations, and its models that failed to load.

    Args:
        repository: the pool's model repository (None: models are given as configs).
        execution_timeout: ``Pool(execution_timeout=)``, for models that set none.

    Raises:
        ConfigError: ``execution_timeout`` is not a positive number of seconds.
    """

    def __init__(self, repository: str | os.PathLike[str] | None, execution_timeout: float | None) -> None:
        self.repository = repository
        self.execution_timeout: float | None = None
        if execution_timeout is not None:
            try:
                self.execution_timeout = check_timeout(execution_timeout, allow_zero=False)
            except ValueError as e:
                raise ConfigError(f"Pool: execution_timeout: {e}", key="execution_timeout") from None
        #: models that could not be loaded: a repository's whose configuration could not
        #: be read (version None), any whose file is missing, and failed loads; changed
        #: in place (the admission holds the same list)
        self.errors: list[ModelStatus] = []

    def starting(
        self, models: Iterable[ModelConfig], load_models: Iterable[str] | None, strict: bool
    ) -> list[ModelConfig]:
        """The configurations a pool starts with: the repository's models (or those of
        ``load_models``) and ``models``. Unless ``strict``, a model that cannot be read
        or whose file is missing is left out and recorded in :attr:`errors`.

        Raises:
            ConfigError: ``strict`` and a model cannot be loaded; or, without
                ``load_models``, no model at all can.
            ValueError: a model version repeats; no repository and no models.
        """
        errors: list[tuple[str, ConfigError]] = []
        kept = None if strict else errors
        if load_models is not None:  # (some of the repository's models, maybe none)
            if self.repository is None:
                raise ValueError("Pool: load_models names models of a repository; give the repository")
            configs = self._some(load_models, kept)
        else:
            configs = list(load_repository(self.repository, kept)) if self.repository is not None else []
        configs = self._with_timeout([*configs, *models])
        keys = [(c.name, c.version) for c in configs]
        if len(set(keys)) != len(keys):
            repeated = sorted({f"{n} version {v}" for n, v in keys if keys.count((n, v)) > 1})
            raise ValueError(f"models repeat: {repeated}")
        if not configs and not errors and load_models is None:
            raise ValueError("Pool needs a model repository or models=[ModelConfig(...)]")
        self.errors += [ModelStatus(name, None, "failed", str(e)) for name, e in errors]
        usable = []
        for cfg in configs:
            try:
                cfg.check_files()
            except ConfigError as e:
                if strict:
                    raise
                errors.append((cfg.name, e))
                self.errors.append(ModelStatus(cfg.name, cfg.version, "failed", str(e)))
                continue
            usable.append(cfg)
        if not usable and load_models is None:
            raise errors[0][1]
        return usable

    def configs_of(self, model: str | ModelConfig | Iterable[ModelConfig]) -> list[ModelConfig]:
        """The configurations ``Pool.load(model)`` is given, read and checked.

        Raises:
            ConfigError: no repository to read ``model`` from, no such model in it, an
                invalid configuration, or a missing file.
            ValueError: configurations of several models, or a version repeated.
        """
        if isinstance(model, str):
            if self.repository is None:
                raise ConfigError(
                    f"Pool.load({model!r}) reads the model from the pool's repository, and this pool has none; "
                    "give its ModelConfig instead",
                    model=model,
                )
            configs = load_model(self.repository, model)
        else:
            configs = [model] if isinstance(model, ModelConfig) else list(model)
        names = sorted({c.name for c in configs})
        if len(names) != 1:
            raise ValueError(f"Pool.load: the configurations of one model, every version of it; got models {names}")
        versions = [c.version for c in configs]
        if len(set(versions)) != len(versions):
            raise ValueError(f"Pool.load: model {names[0]!r}: versions repeat: {sorted(versions)}")
        configs = self._with_timeout(configs)
        for cfg in configs:
            cfg.check_files()
        return configs

    def failed(self, name: str, error: BaseException | None) -> None:
        """Record why ``name`` could not be loaded (None: forget it)."""
        kept = [s for s in self.errors if s.name != name]
        if error is not None:
            kept.append(ModelStatus(name, None, "failed", str(error).split("\n", 1)[0]))
        self.errors[:] = kept

    def has_failed(self, name: str) -> bool:
        """Whether ``name`` is recorded as failed to load."""
        return any(s.name == name for s in self.errors)

    def _some(self, names: Iterable[str], errors: list[tuple[str, ConfigError]] | None) -> list[ModelConfig]:
        """The configurations of the repository's models ``names`` (see ``load_repository``
        for ``errors``)."""
        assert self.repository is not None
        configs: list[ModelConfig] = []
        for name in dict.fromkeys(names):
            try:
                configs += load_model(self.repository, name)
            except ConfigError as e:
                if errors is None:
                    raise
                errors.append((name, e))
        return configs

    def _with_timeout(self, configs: list[ModelConfig]) -> list[ModelConfig]:
        """``configs``, those without an ``execution_timeout`` given the pool's."""
        limit = self.execution_timeout
        if limit is None:
            return configs
        return [c if c.execution_timeout is not None else replace(c, execution_timeout=limit) for c in configs]
