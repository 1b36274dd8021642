"""Evaluate a checkpoint on verification sets: `python eval.py ckpt_path=... eval_sets=[lfw,cfp_fp,agedb_30]`.

Each name in eval_sets is a config in conf/verification/. Prints a table, writes
results.json and roc.png to the run's output dir (see --help for the options).
"""
import hydra
from omegaconf import DictConfig

from facerec.config import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    from facerec.evaluation.evaluate import evaluate

    results = evaluate(cfg)
    return sum(r.accuracy for r in results.values()) / len(results)


if __name__ == "__main__":
    main()
