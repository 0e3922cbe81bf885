import sys, traceback, torch
sys.path.insert(0, "tests")
from test_adapters import tiny_unet, inputs
from engine.adapters import inject, make_config
torch.backends.cuda.matmul.allow_tf32 = False
def trial(method, in_place, batched=True, mode="thread_local"):
    unet = tiny_unet().to("cuda", torch.bfloat16).train()
    extra = {"max_rank": 8} if method == "lora2" else {}
    ad = inject(unet, make_config(method, rank=4, **extra))
    ad.set_grads_in_place(in_place)
    if method == "lora2":
        ad._entropy_options["batched"] = batched
    x, t, c = (a.to("cuda") for a in inputs())
    x, c = x.bfloat16(), c.bfloat16()
    params = ad.parameters()
    def step():
        ad.reset_step()
        loss = unet(x, t, c).sample.float().pow(2).mean()
        extra, _ = ad.extra_loss()
        (loss if extra is None else loss + extra).backward()
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g, capture_error_mode=mode):
            step()
        g.replay(); torch.cuda.synchronize()
        print(method, in_place, batched, mode, "OK", flush=True)
    except Exception as e:
        print(method, in_place, batched, mode, "FAIL", type(e).__name__, str(e)[:300], flush=True)
        traceback.print_exc(limit=-6)
for args in [("tri_lora", True), ("lora2", True, True)]:
    import subprocess
    r = subprocess.run([sys.executable, "-c", f"import sys; sys.argv=['x']; exec(open('bench/debug/capdbg_body.py').read()); trial(*{args!r})"], capture_output=True, text=True)
    print(r.stdout[-1500:], r.stderr[-2500:])
