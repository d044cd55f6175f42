"""The plain PyTorch loop shelltrain's default job is compared with (benchmarks/everyday_speed.py): the same work as
`shelltrain model=resnet18 data=digits` in about 60 lines. Digits carved 20% test, then 10% val (stratified, seed
0), 32 px, a torchvision model with a 1-channel stem, channels_last, SGD with momentum under OneCycle, one validation
per epoch, the best epoch's weights tested at the end and saved.

    python benchmarks/plain_loop.py --model resnet18 --epochs 8 --out /tmp/plain
"""

import argparse
import copy
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms.v2.functional import resize

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="resnet18", choices=["resnet18", "resnet34", "resnet50"])
parser.add_argument("--epochs", type=int, default=8)
parser.add_argument("--out", type=Path, default=Path("plain_run"))
args = parser.parse_args()
torch.manual_seed(0)

digits = load_digits()
images = torch.from_numpy(digits.images * (255 / 16)).round().to(torch.uint8).unsqueeze(1)
images = resize(images, [32], antialias=True)
labels = torch.from_numpy(digits.target).long()
index = torch.arange(len(labels)).numpy()
rest, test = train_test_split(index, test_size=math.ceil(0.2 * len(index)), random_state=0, stratify=labels[index])
train, val = train_test_split(rest, test_size=math.ceil(0.1 * len(rest)), random_state=0, stratify=labels[rest])


def loader(split, batch_size, shuffle=False):
    x = ((images[split].float() / 255) - 0.3055) / 0.3235
    return DataLoader(TensorDataset(x, labels[split]), batch_size=batch_size, shuffle=shuffle)


train_loader, val_loader, test_loader = loader(train, 32, True), loader(val, 64), loader(test, 64)
model = torchvision.models.get_model(args.model, num_classes=10)
model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)  # grey input
model = model.to(memory_format=torch.channels_last)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
steps = args.epochs * len(train_loader)
scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=steps, pct_start=0.25)


def evaluate(data):
    model.eval()
    correct = loss = 0.0
    with torch.no_grad():
        for x, y in data:
            logits = model(x.to(memory_format=torch.channels_last))
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
    return loss / len(data.dataset), correct / len(data.dataset)


best_acc, best_state = -1.0, None
for epoch in range(args.epochs):
    model.train()
    for x, y in train_loader:
        loss = F.cross_entropy(model(x.to(memory_format=torch.channels_last)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    val_loss, val_acc = evaluate(val_loader)
    print(f"epoch {epoch + 1}/{args.epochs} val_loss {val_loss:.4f} val_acc {val_acc:.4f}")
    if val_acc > best_acc:
        best_acc, best_state = val_acc, copy.deepcopy(model.state_dict())
model.load_state_dict(best_state)
test_loss, test_acc = evaluate(test_loader)
args.out.mkdir(parents=True, exist_ok=True)
torch.save(best_state, args.out / "model.pt")
(args.out / "result.json").write_text(json.dumps({"test_loss": test_loss, "test_acc": test_acc}))
print(f"test_loss {test_loss:.4f} test_acc {test_acc:.4f}")
