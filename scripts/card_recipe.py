"""The model card's inference code, the baseline that bench.py and the README's speed figures compare against:
PIL decode at full size, torchvision Resize + ToTensor + Normalize, fp32 eager, one MSE per image.

    python scripts/card_recipe.py photos/ --checkpoint runs/cifar10/model_best_checkpoint.ckpt
    hyperfine 'python scripts/card_recipe.py photos/ --checkpoint CKPT' \
              'python inference_example.py photos/ --checkpoint CKPT --thresholds thresholds_calibrated.json'
"""

import sys
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: the repo's modules
from images import iter_image_files  # noqa: E402
from model import load_model  # noqa: E402
from utils import ArgumentParser, number, run_cli  # noqa: E402


def card_recipe(model, paths, batch_size, device):
    """Yields (path, mse) for every file, decoded and scored as the card does it."""
    size = model.config.image_size  # 128 for the card's model
    transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                                    transforms.Normalize(mean=[0.5] * 3, std=[0.5] * 3)])
    for start in range(0, len(paths), batch_size):
        batch = paths[start:start + batch_size]
        x = torch.stack([transform(Image.open(p).convert("RGB")) for p in batch])
        with torch.no_grad():
            yield from zip(batch, model.reconstruction_error(x.to(device), reduction="none").tolist())


def main(argv=None):
    p = ArgumentParser(__doc__)
    p.add_argument("paths", nargs="+", help="image files, folders or globs")
    p.add_argument("--checkpoint", required=True, help="anything load_model accepts")
    p.add_argument("--batch-size", type=number(int, 1), default=32, help="images per forward pass")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.checkpoint, device)
    for path, mse in card_recipe(model, list(iter_image_files(args.paths)), args.batch_size, device):
        print(f"{path}\tmse={mse:.6g}")


if __name__ == "__main__":
    run_cli(main)
