"""Train a face-embedding model: `python train.py [group=option ...] [key=value ...]` (see --help)."""
import hydra
from omegaconf import DictConfig

from facerec.config import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from facerec.training.fit import train

    metrics = train(cfg)
    # The value a Hydra sweeper (e.g. Optuna) optimises.
    return metrics.get(cfg.optimized_metric) if cfg.get("optimized_metric") else None


if __name__ == "__main__":
    main()
