"""CRM, the reference's recipe (Shen et al., CVPR 2022; `train.py` of dvlab-research/Entity,
`High-Quality-Segmention/`): ResNet-50, batch 12, 45,705 steps.

Data: what the reference's `train.py` concatenates — FSS-1000 (class/name.jpg +
class/name.png), DUTS-TR, DUTS-TE, ECSSD and MSRA-10K (name.jpg + name.png in one folder
each, as its `scripts/download_training_dataset.py` lays them out under data/: DUTS-TR,
DUTS-TE, ecssd, MSRA_10K, fss; its README says "MSRA-10K, DUT-OMRON, ECSSD and FSS-1000",
but the code trains on DUTS, not DUT-OMRON) — 10,000 + 10,553 + 5,019 + 1,000 + 10,000 =
36,572 pairs, joined into one split by the local `refine_folder` TFDS builder; ground truths
are used as stored (8-bit, soft; see `jax_refine.data.pipeline`). The backbone starts from
torchvision's ImageNet ResNet-50 (mask channel zero-filled):

    D=/data/crm  # the reference's data/ folder
    python train.py --config configs/crm_paper.py --workdir runs/crm_paper \
      --config.dataset.builder_kwargs.folders=$D/fss,$D/DUTS-TR,$D/DUTS-TE,$D/ecssd,$D/MSRA_10K \
      --config.dataset.data_dir=/data/tfds \
      --config.init_from=/data/resnet50-0676ba61.pth
    python evaluate.py --config configs/crm_paper.py --workdir runs/crm_paper \
      --config.eval.folder=/data/BIG/test

Multi-host: run the same command on every host with JAX_COORDINATOR_ADDRESS=host0:port,
JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i (or --config.distributed=True on a cluster that
jax.distributed.initialize() auto-detects); batch_size is the global batch.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # CRM constructor arguments (jax_refine.models.crm.CRM); paper / official checkpoint.
    config.model = ml_collections.ConfigDict(dict(
        depth=50,  # backbone ResNet depth
        width=64,  # backbone base width
        fusion_channels=(64, 64, 128),  # fusion branch widths for x1, x2, x3
        latent_channels=256,
        latent_level=1,  # 1 = latent at stride 2 (official)
        hidden=(32, 32, 32, 32),  # decoder MLP
        dropout_rate=0.5,
    ))

    config.dataset = ml_collections.ConfigDict()
    config.dataset.name = "refine_folder"  # 'synthetic' or a jax_refine.data.tfds builder
    config.dataset.data_dir = ""  # TFDS build directory (required for builders)
    config.dataset.config = ""  # builder config name ('' = the builder's default)
    config.dataset.split = "train"
    # Passed to the builder: comma-separated training folders.
    config.dataset.builder_kwargs = ml_collections.ConfigDict(dict(folders=""))
    config.dataset.min_size = 0  # synthetic only: scene side range
    config.dataset.max_size = 0
    config.dataset.subset_prob = 0.0  # synthetic only: share of targets that are object subsets
    # Training coarse masks: perturb_mask of gt > 0 with target IoU ~ U[iou_range) (paper),
    # its IoU stop against the contour-thinned mask ('thinned', the reference) or the GT
    # ('gt'); or with probability lowres_prob coarse_from_lowres with a factor
    # ~ U[lowres_factors]; then with probability soft_prob a Gaussian blur of sigma
    # ~ U[soft_sigma] px (see CoarseSpec).
    config.dataset.coarse = ml_collections.ConfigDict(dict(
        iou_range=(0.8, 1.0), iou_against="thinned", lowres_prob=0.0,
        lowres_factors=(4.0, 16.0), soft_prob=0.0, soft_sigma=(0.5, 3.0)))

    config.crop_size = 224  # random crop side; the decoder is queried at every pixel
    config.batch_size = 12  # global batch (all devices of all hosts)
    # The reference's run length (`optim.whole_epoch_steps`): its `-i 45000` rounded to
    # whole epochs of 36,572 // 12 = 3,047 batches (drop_last) -> 15 epochs = 45,705 steps
    # (its released model is model_45705). Other data: whole_epoch_steps(45_000, n, 12).
    config.total_steps = 45_705
    config.learning_rate = 2.25e-4
    # lr x lr_decay_factor at these fractions of total_steps: the reference's MultiStepLR
    # milestones, iterations 22,500 and 37,500 (not rescaled to its 45,705 steps), stepped
    # per iteration: 0-based steps >= 22,500 run at 2.25e-5, >= 37,500 at 2.25e-6.
    config.lr_boundaries = (22_500 / 45_705, 37_500 / 45_705)
    config.lr_decay_factor = 0.1
    config.weight_decay = 1e-4  # L2 added to the gradient (torch Adam), not AdamW
    config.dtype = "float32"  # compute dtype: 'float32' or 'bfloat16' (params stay f32)
    config.seed = 0

    config.log_every = 50  # steps between metric writes (means over the interval)
    config.checkpoint_every = 2_500
    config.keep_checkpoints = 3
    config.export_every_checkpoint = False  # also refresh workdir/refiner at each checkpoint
    config.init_from = ""  # Refiner checkpoint dir or torchvision ResNet .pth ('' = scratch)
    config.distributed = False  # force jax.distributed.initialize() (cluster auto-detect)
    # Every eval_every steps (and at the end) the loop runs this config's evaluation (the
    # `eval` block below, as evaluate.py) and writes its scalars and a panel to TensorBoard
    # and WORKDIR/eval/step_N; 0 = never.
    config.eval_every = 0
    config.profile_every = 0  # steps between 5-step jax.profiler traces (0 = none)
    # GPU: XLA_FLAGS=--xla_gpu_deterministic_ops=true, needed for bitwise-exact resume and
    # repeatable runs on GPUs (scatter-add gradients are otherwise non-deterministic); slower.
    config.deterministic = False

    # evaluate.py: a BIG-layout folder (name_im.jpg, name_gt.png, name_seg.png).
    config.eval = ml_collections.ConfigDict()
    config.eval.folder = ""
    config.eval.scales = (0.125, 0.25, 0.5, 1.0)  # multi-resolution Refiner schedule
    config.eval.num_images = 0  # 0 = all
    config.eval.num_pngs = 4  # side-by-side PNGs written
    return config
