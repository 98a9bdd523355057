"""The two hashing networks of DJSRH.

ImgNet: an ImageNet CNN trunk up to fc7 (4096-d, after its ReLU) and a new linear hash layer.
TxtNet: Linear(d_T, 4096) -> ReLU -> Linear(4096, d).
FeatureImgNet: ImgNet on stored fc7 features, an MLP (docs/features.md).
Both return (features, H, B) with B = tanh(alpha * H), alpha = sqrt(epoch + 1) for the
0-based epoch (the authors' `set_alpha`), so alpha = sqrt(t) for the 1-based epoch t.
"""
import copy
import math
import pickle
import zipfile

import torch
import torch.nn as nn
import torchvision

from settings import UserError

# The backbones are torchvision's models of the names in settings.BACKBONES.


# What a failed download or a truncated, corrupt or foreign weights file makes torchvision and
# torch.load raise (URLError and HTTPError are OSErrors; a hash mismatch or a broken zip is a
# RuntimeError). Anything else is a bug of ours and keeps its traceback.
WEIGHTS_ERRORS = (OSError, EOFError, KeyError, ValueError, RuntimeError,
                  pickle.UnpicklingError, zipfile.BadZipFile)


def build_backbone(name, pretrained=True, pretrained_path=''):
    """A torchvision CNN with ImageNet weights (from PRETRAINED_PATH if given) or random ones."""
    if not pretrained:
        return he_init(torchvision.models.get_model(name, weights=None))
    if pretrained_path:
        return load_local_weights(torchvision.models.get_model(name, weights=None), name,
                                  pretrained_path)
    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    try:
        return torchvision.models.get_model(name, weights=weights)
    except WEIGHTS_ERRORS as err:  # offline, proxy, truncated download: the same fix
        raise UserError(
            f"could not get the ImageNet weights of {name} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); download {weights.url} and pass "
            f"PRETRAINED_PATH=<that file>, or PRETRAINED=False to start from random weights"
        ) from err


def he_init(model):
    """He (Kaiming) initialisation of every conv and linear layer, zero biases.

    Only for PRETRAINED=False (the demo, the tests). PyTorch's default initialisation shrinks
    AlexNet's activations layer after layer: its fc7 outputs come out about 200 times smaller
    than the hash layer's bias, every image gets the same code, and nothing is learned in a
    few epochs. He initialisation keeps their scale, so random features carry the images'
    structure, as pretrained ones do."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity='relu')
            nn.init.zeros_(m.bias)
    return model


def load_local_weights(model, name, path):
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise UserError(f"PRETRAINED_PATH={path!r}: no such file") from None
    except WEIGHTS_ERRORS as err:
        raise UserError(f"PRETRAINED_PATH={path!r}: not a PyTorch weights file "
                        f"({type(err).__name__})") from err
    if isinstance(state, dict) and 'state_dict' in state:
        state = state['state_dict']
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError):
        raise UserError(f"PRETRAINED_PATH={path!r}: does not hold the ImageNet weights of "
                        f"torchvision's {name} (keys or shapes differ)") from None
    return model


def up_to_fc7(classifier):
    """The classifier's layers up to fc7 after its ReLU (the second ReLU):
    AlexNet: Dropout, fc6, ReLU, Dropout, fc7, ReLU (the authors' 6 layers);
    VGG-19: fc6, ReLU, Dropout, fc7, ReLU (5; the 6th is a Dropout on fc7)."""
    layers = list(classifier.children())
    relus = [i for i, layer in enumerate(layers) if isinstance(layer, nn.ReLU)]
    return nn.Sequential(*layers[:relus[1] + 1])


class HashNet(nn.Module):
    """What the three networks share: B = tanh(alpha * H), alpha = sqrt(epoch + 1) for the
    0-based epoch (the authors' set_alpha)."""

    def __init__(self):
        super().__init__()
        self.alpha = 1.0

    def set_alpha(self, epoch):
        self.alpha = math.sqrt(epoch + 1.0)

    def output(self, feat, hid):
        # In fp32 whatever autocast made of H: in bf16, tanh(alpha H) rounds to +-1, and its
        # gradient to 0, from |alpha H| ~ 3.5 instead of ~9.
        return feat, hid, torch.tanh(self.alpha * hid.float())


class ImgNet(HashNet):
    """CNN trunk up to fc7 + hash layer. Dropout in the classifier is active in train mode."""

    def __init__(self, backbone='vgg19', code_len=64, pretrained=True, pretrained_path='',
                 trunk=None):
        super().__init__()
        net = trunk if trunk is not None else build_backbone(backbone, pretrained,
                                                             pretrained_path)
        self.features = net.features
        self.avgpool = net.avgpool
        self.classifier = up_to_fc7(net.classifier)
        self.hash = nn.Linear(4096, code_len)

    def fc7(self, x):
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))

    def pool(self, x):
        """The backbone's adaptive average pooling, by a route that gives the same numbers
        and has a deterministic backward on CUDA (AdaptiveAvgPool2d's has none, so
        DETERMINISTIC=True would stop at the first step): none where the map already has
        the output size (224 px crops), a copy of each value where each output cell covers
        one input cell (AlexNet at 64 px: 1 x 1 to 6 x 6); else the pooling itself."""
        out_h, out_w = pool_size(self.avgpool)
        n, c, h, w = x.shape
        if (h, w) == (out_h, out_w):
            return x
        if out_h % h == 0 and out_w % w == 0:
            x = x[:, :, :, None, :, None].expand(n, c, h, out_h // h, w, out_w // w)
            return x.reshape(n, c, out_h, out_w)
        return self.avgpool(x)

    def pools_for_real(self, crop):
        """True when crops of `crop` pixels take the pooling itself (no deterministic CUDA
        backward), found by one forward of the trunk on a blank image."""
        weight = next(self.features.parameters())
        with torch.no_grad():
            _, _, h, w = self.features(weight.new_zeros(1, 3, crop, crop)).shape
        out_h, out_w = pool_size(self.avgpool)
        return not (out_h % h == 0 and out_w % w == 0)

    def forward(self, x):
        feat = self.fc7(x)
        return self.output(feat, self.hash(feat))

    def frozen_copy(self):
        """The feature network for S_I: the same starting weights, eval mode, no gradients."""
        twin = copy.deepcopy(self).eval()
        del twin.hash
        for p in twin.parameters():
            p.requires_grad_(False)
        return twin

    def head_parameters(self):
        """fc6, fc7 and the hash layer: what Wiki trains (TRAIN_ALL_IMG=False)."""
        return list(self.classifier.parameters()) + list(self.hash.parameters())


class FeatureImgNet(HashNet):
    """The image network on stored features (IMAGE_FEATURES, PUBLISHED): the same interface
    as ImgNet. The features are the frozen CNN's fc7 already, so fc7(x) is x itself, and the
    trained part is an MLP: Linear(d, hidden) -> ReLU -> Dropout(0.5) -> hash layer, the
    image network of DGCPN's code (the DJSRH code base run on VGG-19 fc7 features)."""

    def __init__(self, feat_dim, code_len=64, hidden=4096):
        super().__init__()
        self.features = nn.Sequential()   # no trunk: nothing to freeze (TRAIN_ALL_IMG=False)
        if hidden:
            self.classifier = nn.Sequential(nn.Linear(feat_dim, hidden), nn.ReLU(inplace=True),
                                            nn.Dropout(0.5))
        else:  # FEATURE_HIDDEN=0: the hash layer right on fc7, as in ImgNet
            self.classifier = nn.Sequential()
        self.hash = nn.Linear(hidden or feat_dim, code_len)

    def fc7(self, x):
        return x.float()

    def forward(self, x):
        feat = self.classifier(x.float())
        return self.output(feat, self.hash(feat))

    def frozen_copy(self):
        """The feature network for S_I: the stored features as they are."""
        return StoredFeatures()

    def head_parameters(self):
        return list(self.parameters())


class StoredFeatures(nn.Module):
    """FeatNet_I on stored features: fc7(x) = x."""

    def fc7(self, x):
        return x.float()


def pool_size(pool):
    size = pool.output_size
    return (size, size) if isinstance(size, int) else tuple(size)


def check_shapes(path, what, net, saved):
    """A checkpoint's weights fit `net` (the features may have changed width since)."""
    for key, now in net.state_dict().items():
        then = saved.get(key)
        if then is not None and tuple(then.shape) != tuple(now.shape):
            raise UserError(f"checkpoint {path}: {key} of the {what} is "
                            f"{tuple(then.shape)} in it but {tuple(now.shape)} for the data now "
                            f"(the features changed width?); use the data it was trained on, "
                            f"or RESUME=False")


class TxtNet(HashNet):
    def __init__(self, txt_dim, code_len=64):
        super().__init__()
        self.fc1 = nn.Linear(txt_dim, 4096)
        self.fc2 = nn.Linear(4096, code_len)

    def forward(self, x):
        feat = torch.relu(self.fc1(x))
        return self.output(feat, self.fc2(feat))


def binarize(hid):
    """sign(H) in {-1, +1}; sign(0) is taken as +1 so every code is a valid binary code."""
    return torch.where(hid >= 0, 1, -1).to(torch.int8)
