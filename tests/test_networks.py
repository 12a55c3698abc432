"""Hand-written networks: shapes, conditioning, GroupNorm batch independence."""

import pytest
import torch

from lightning_modules.networks import ConditionalUnet1D, ResNet18GN


def test_resnet18_shapes_and_parameter_count():
    net = ResNet18GN(out_dim=512, width=64)
    assert 11.0e6 < sum(p.numel() for p in net.parameters()) < 11.8e6  # torchvision resnet18: 11.7M
    assert net(torch.rand(2, 3, 96, 96)).shape == (2, 512)
    small = ResNet18GN(out_dim=64, width=16)
    assert small(torch.rand(3, 3, 64, 64)).shape == (3, 64)


def test_resnet_without_stem_maxpool_keeps_twice_the_resolution():
    x = torch.rand(2, 3, 56, 56)  # the cpu_rgb crop
    pooled, full = ResNet18GN(out_dim=8, width=16), ResNet18GN(out_dim=8, width=16, maxpool=False)
    assert pooled.stages(pooled.stem(x)).shape[-2:] == (2, 2)
    assert full.stages(full.stem(x)).shape[-2:] == (4, 4)
    assert full(x).shape == (2, 8)
    # no weights in the max-pool: one's checkpoint loads into the other
    full.load_state_dict(pooled.state_dict())


def test_groupnorm_makes_samples_independent_of_the_batch():
    torch.manual_seed(0)
    net = ResNet18GN(out_dim=32, width=16).train()
    x = torch.rand(4, 3, 48, 48)
    alone = net(x[:1])
    together = net(x)[:1]
    torch.testing.assert_close(alone, together, rtol=1e-4, atol=1e-5)


def test_unet_shapes_and_horizon_check():
    net = ConditionalUnet1D(action_dim=7, cond_dim=32, channels=(32, 64, 128), step_embed_dim=32)
    out = net(torch.randn(5, 16, 7), torch.randint(0, 100, (5,)), torch.randn(5, 32))
    assert out.shape == (5, 16, 7)
    assert net(torch.randn(2, 8, 7), torch.tensor(3), torch.randn(2, 32)).shape == (2, 8, 7)
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(2, 10, 7), torch.tensor(3), torch.randn(2, 32))


def test_unet_output_depends_on_condition_and_timestep():
    torch.manual_seed(0)
    net = ConditionalUnet1D(action_dim=7, cond_dim=16, channels=(32, 64), step_embed_dim=32)
    x, c = torch.randn(2, 16, 7), torch.randn(2, 16)
    base = net(x, torch.tensor([10, 10]), c)
    assert not torch.allclose(base, net(x, torch.tensor([10, 10]), c + 1.0))
    assert not torch.allclose(base, net(x, torch.tensor([90, 90]), c))
    # per-sample: changing sample 1's condition leaves sample 0's output alone
    c2 = c.clone()
    c2[1] += 1.0
    torch.testing.assert_close(net(x, torch.tensor([10, 10]), c2)[0], base[0])


def test_resnet_film_starts_as_the_plain_resnet_and_needs_its_vector():
    torch.manual_seed(0)
    plain, film = ResNet18GN(out_dim=8, width=8), ResNet18GN(out_dim=8, width=8, film_dim=4)
    missing, unexpected = film.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".film." in k for k in missing)
    x = torch.rand(3, 3, 32, 32)
    # zero-initialised FiLM: any vector leaves the plain network's output
    torch.testing.assert_close(film(x, torch.randn(3, 4)), plain(x))
    with pytest.raises(ValueError, match="film vector"):
        film(x)
    with pytest.raises(ValueError, match="film vector"):
        plain(x, torch.randn(3, 4))


def two_squares(n: int, generator: torch.Generator):
    """Images (n, 3, 32, 32) with a red and a blue 6 px square at random places, which one is
    named (n,) and the named square's centre (n, 2) in [-1, 1]."""
    images = torch.zeros(n, 3, 32, 32)
    corners = torch.randint(0, 26, (n, 2, 2), generator=generator)
    for i in range(n):
        for colour, (r, c) in zip((0, 2), corners[i].tolist()):
            images[i, colour, r:r + 6, c:c + 6] = 1.0
    named = torch.randint(0, 2, (n,), generator=generator)
    centre = corners[torch.arange(n), named].flip(-1).float() + 2.5  # (x, y) in pixels
    return images, named, centre / 31 * 2 - 1


def test_resnet_film_learns_to_find_the_object_its_vector_names():
    """Two squares, a one-hot vector naming one: the FiLM ResNet learns where the named one is
    (its spatial-softmax keypoints follow the vector); the target is not in the image alone."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = ResNet18GN(out_dim=2, width=8, maxpool=False, film_dim=2)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(250):
        images, named, centre = two_squares(32, g)
        loss = ((net(images, torch.nn.functional.one_hot(named, 2).float()) - centre) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    images, named, centre = two_squares(256, g)
    with torch.no_grad():
        right = ((net(images, torch.nn.functional.one_hot(named, 2).float()) - centre) ** 2).mean()
        wrong = ((net(images, torch.nn.functional.one_hot(1 - named, 2).float()) - centre) ** 2).mean()
    chance = ((centre - centre.mean(0)) ** 2).mean()  # predicting the mean position
    print(f"named square: mse {right:.4f}; other square named {wrong:.4f}; the mean position {chance:.4f}")
    assert right < 0.15 * chance and wrong > 5 * right
