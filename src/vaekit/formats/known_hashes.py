"""SHA-256 of well-known VAE files, read from their published LFS pointers, to tell families apart."""

# sha256 -> (family, description with repo/path)
# Every digest was read from a stored Git LFS pointer (`oid sha256:`) or from a stored public file
# that states the digest for the named upstream file; none is recalled from memory. Sizes in bytes.
KNOWN_HASHES: dict[str, tuple[str, str]] = {
    # --- SD1.x / SD2.x 4-channel KL VAE -------------------------------------------------------
    "a2b5134f4dbc140d9c11f11cba3233099e00af40f262f136c691fb7d38d2194c": (
        "sd1",
        "stable-diffusion-v1-5/stable-diffusion-v1-5 vae/diffusion_pytorch_model.safetensors (334643276)",
    ),
    "4fbcf0ebe55a0984f5a5e00d8c4521d52359af7229bb4d81890039d2aa16dd7c": (
        "sd1",
        "stable-diffusion-v1-5/stable-diffusion-v1-5 vae/diffusion_pytorch_model.fp16.safetensors",
    ),
    "a1d993488569e928462932c8c38a0760b874d166399b14414135bd9c42df5815": (
        "sd1",
        "stabilityai/sd-vae-ft-mse diffusion_pytorch_model.safetensors (334643276)",
    ),
    "735e4c3a447a3255760d7f86845f09f937809baa529c17370d83e4c3758f3c75": (
        "sd1",
        "stabilityai/sd-vae-ft-mse-original vae-ft-mse-840000-ema-pruned.safetensors (334641190)",
    ),
    "c6a580b13a5bc05a5e16e4dbb80608ff2ec251a162311590c1f34c013d7f3dab": (
        "sd1",
        "stabilityai/sd-vae-ft-mse-original vae-ft-mse-840000-ema-pruned.ckpt",
    ),
    "32db726da04f06c1b6b14c0043ce115cc87a501482945c5add89a40d838fcb46": (
        "sd1",
        "stabilityai/sd-vae-ft-ema diffusion_pytorch_model.safetensors (334643276)",
    ),
    "0b204ad0cae549e0a7e298d803d57e36363760dec71c63109c1da3e1147ec520": (
        "sd1",
        "stabilityai/sd-vae-ft-ema-original vae-ft-ema-560000-ema-pruned.ckpt",
    ),
    "95f26a5ab04779d5467d1fcecaf93160ffa523afe399b835b3e1bb77ff2d937a": (
        "sd1",
        "stabilityai/sd-vae-ft-ema-original vae-ft-ema-560000-ema-pruned.safetensors",
    ),
    # --- SDXL 4-channel KL VAE ----------------------------------------------------------------
    "63aeecb90ff7bc1c115395962d3e803571385b61938377bc7089b36e81e92e2e": (
        "sdxl",
        "stabilityai/sdxl-vae sdxl_vae.safetensors (334641164)",
    ),
    "1598f3d24932bcfe6634e8b618ea1e30ab1d57f5aad13a6d2de446d2199f2341": (
        "sdxl",
        "stabilityai/stable-diffusion-xl-base-1.0@91704abb vae/diffusion_pytorch_model.safetensors",
    ),
    "27ed3b02e09638568e99d4398c67bc654dde04e6c0db61fb2d21dba630e7058a": (
        "sdxl",
        "stabilityai/stable-diffusion-xl-base-1.0 vae/diffusion_pytorch_model.safetensors (other rev)",
    ),
    "bcb60880a46b63dea58e9bc591abe15f8350bde47b405f9c38f4be70c6161e68": (
        "sdxl",
        "stabilityai/stable-diffusion-xl-base-1.0 vae/diffusion_pytorch_model.fp16.safetensors",
    ),
    "eb6516ab7e1104d5d1a174a4d65c57835ae38061531d0a2192103aecfb790cc1": (
        "sdxl",
        "stabilityai/stable-diffusion-xl-base-1.0 vae_1_0/diffusion_pytorch_model.fp16.safetensors",
    ),
    "235745af8d86bf4a4c1b5b4f529868b37019a10f7c0b2e79ad0abca3a22bc6e1": (
        "sdxl",
        "madebyollin/sdxl-vae-fp16-fix sdxl_vae.safetensors (334641162)",
    ),
    "1b909373b28f2137098b0fd9dbc6f97f8410854f31f84ddc9fa04b077b0ace2c": (
        "sdxl",
        "madebyollin/sdxl-vae-fp16-fix diffusion_pytorch_model.safetensors",
    ),
    # --- SD3 16-channel KL VAE ----------------------------------------------------------------
    "8f53304a79335b55e13ec50f63e5157fee4deb2f30d5fae0654e2b2653c109dc": (
        "sd3",
        "stabilityai/stable-diffusion-3.5-large (same in -large-turbo, -medium)"
        " vae/diffusion_pytorch_model.safetensors (167666902)",
    ),
    # --- FLUX.1 16-channel KL VAE -------------------------------------------------------------
    "afc8e28272cd15db3919bacdb6918ce9c1ed22e96cb12c4d5ed0fba823529e38": (
        "flux",
        "black-forest-labs/FLUX.1-schnell / FLUX.1-dev ae.safetensors (335304388)",
    ),
    "f5b59a26851551b67ae1fe58d32e76486e1e812def4696a4bea97f16604d40a3": (
        "flux",
        "black-forest-labs/FLUX.1-schnell / FLUX.1-dev vae/diffusion_pytorch_model.safetensors (167666902)",
    ),
    # --- Tiny autoencoders (TAESD family) -----------------------------------------------------
    "db169d69145ec4ff064e49d99c95fa05d3eb04ee453de35824a6d0f325513549": (
        "taesd",
        "madebyollin/taesd diffusion_pytorch_model.safetensors (9793292)",
    ),
    "ff4824aca94dd6111e0340fa749347fb74101060d9712cb5ef1ca8f1cf17502f": (
        "taesdxl",
        "madebyollin/taesdxl diffusion_pytorch_model.safetensors (9793292)",
    ),
    "6f79c1397cb9ce1dac363722dbe70147aee0ccca75e28338f8482fe515891399": (
        "taesd3",
        "madebyollin/taesd3 diffusion_pytorch_model.safetensors (9848636)",
    ),
    "927f7de7f11bbd3b2d5ce402e608d97a7649e0921a9601995b044e8efc81e449": (
        "taef1",
        "madebyollin/taef1 diffusion_pytorch_model.safetensors",
    ),
    # --- tiny partners of FLUX.2 and Sana (madebyollin/taesd at commit 5cccb12, MIT; digests in shared/weights) ----
    "10a4e1021e89d7551eaf161352da8dbd0b1aa83872ae28b150c1df1ce2f147b6": (
        "taef2",
        "madebyollin/taesd taef2_encoder.pth (2704692)",
    ),
    "0a44a31e1ae59eb9dbf9359d24942fd3ef5928162c1800d97a28c61d51be0ab5": (
        "taef2",
        "madebyollin/taesd taef2_decoder.pth (2704756)",
    ),
    "858f4e4cc293f88efaf58107f4154b960b9ced0cb5d9c050dad11f926b618c1f": (
        "taesana",
        "madebyollin/taesd taesana_encoder.pth (2537004)",
    ),
}
