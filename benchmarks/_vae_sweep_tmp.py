import torch, torch.nn.functional as F, sys, random, time, json, os
from diffusers import AutoencoderKL
sys.path.insert(0, '.')
from fluxlora.toy import build, world, pretrain, detect
dev = 'cuda'
VARIANTS = {
 'base': dict(cfg={}, w=0, lr=1e-3, bs=12),
 'w10': dict(cfg={}, w=10, lr=1e-3, bs=12),
 'w10_lc8_c32': dict(cfg=dict(latent_channels=8, block_out_channels=(32,64,64), norm_num_groups=8), w=10, lr=1e-3, bs=12),
 'w10_lc16': dict(cfg=dict(latent_channels=16, block_out_channels=(32,64,128), norm_num_groups=8), w=10, lr=1e-3, bs=12),
 'w10_lr3e-4': dict(cfg={}, w=10, lr=3e-4, bs=12),
 'w10_g1': dict(cfg=dict(norm_num_groups=1), w=10, lr=1e-3, bs=12),
 'w10_g16_c32': dict(cfg=dict(block_out_channels=(32,64,64), norm_num_groups=16), w=10, lr=1e-3, bs=12),
 'w10_lr2e-3': dict(cfg={}, w=10, lr=2e-3, bs=12),
}
rng0 = random.Random(77); scenes = [world.random_scene(rng0) for _ in range(200)]
imgs = [world.render(s) for s in scenes]
xe = pretrain.to_tensor(imgs).to(dev)
def evaluate(vae):
    with torch.no_grad(): r = vae.decode(vae.encode(xe).latent_dist.mean).sample
    r = ((r.clamp(-1,1)+1)*127.5).round().byte().permute(0,2,3,1).cpu().numpy()
    return detect.accuracy(zip(scenes, list(r)))
names = sys.argv[1].split(',') if len(sys.argv) > 1 else list(VARIANTS)
for name in names:
    v = VARIANTS[name]
    cfg = dict(build.VAE_CONFIG); cfg.update(v['cfg'])
    torch.manual_seed(0); vae = AutoencoderKL(**cfg).to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=v['lr'], weight_decay=0)
    rng = random.Random(0); gen = world.stream(0); t = time.time(); steps = 6000
    for i in range(steps):
        lr = v['lr'] * 0.5 * (1 + __import__('math').cos(3.14159 * i / steps))
        for g in opt.param_groups: g['lr'] = lr
        x = pretrain.to_tensor([next(gen)[0] if rng.random() < 0.6 else pretrain.generic_image(rng, 64) for _ in range(v['bs'])]).to(dev)
        border = torch.cat([x[:,:,0,:], x[:,:,-1,:]], -1).median(-1).values[:,:,None,None]
        w = 1 + v['w'] * ((x - border).abs().sum(1, keepdim=True) > 0.1).float()
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        loss = (w * (rec - x) ** 2).mean() / w.mean() + 0.5 * (w * (rec - x).abs()).mean() / w.mean()
        opt.zero_grad(); loss.backward(); opt.step()
        if i + 1 in (1000, 2500, 4000, 6000):
            acc = evaluate(vae)
            print(name, i + 1, {k: round(a, 3) for k, a in acc.items()}, f'{time.time()-t:.0f}s', flush=True)
