"""Evaluate a model on evaluation sets: `python eval.py ckpt_path=... eval_sets=[lfw,cfp_fp,agedb_30]`.

The model: ckpt_path=<train.py checkpoint>, model=<backbone> weights=<insightface backbone.pth>,
or onnx_path=<model.onnx> (exactly one). Each name in eval_sets is a config in conf/evalset/ (the
entries train.py's val_sets names).
Prints one table per kind of result, writes results.json and curves.png to the run's output dir
(see --help for the options).
"""
import hydra
from omegaconf import DictConfig

from facerec.config import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    from facerec.evaluation import mean_accuracy
    from facerec.evaluation.evaluate import evaluate

    # The value a Hydra sweeper optimises: the mean accuracy of the pair sets (None without any).
    return mean_accuracy(evaluate(cfg))


if __name__ == "__main__":
    main()
