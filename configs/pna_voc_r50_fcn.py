"""PNA, the paper's Pascal VOC setting (Liu et al., AAAI 2023, Table 1): ResNet-50, FCN
coarse head at output stride 32, PNA head D = 96/192/384/768, window 9; VOC 2012 with the
SBD augmentation (10,582 training images, 21 classes), 512x512 crops, batch 16, 20k steps,
AdamW 1e-4, weight decay 0.01, poly 0.9, gradient clipping by global norm 0.01.

Data: a `semantic_folder` build of local folders (images name.jpg + label maps name.png with
class ids 0..20 and 255 = ignore; SBD's .mat labels must be converted to PNG first):

    python train.py --config configs/pna_voc_r50_fcn.py --workdir runs/pna_voc \
      --config.dataset.data_dir=/data/tfds \
      --config.dataset.builder_kwargs.images=/data/VOCaug/JPEGImages \
      --config.dataset.builder_kwargs.labels=/data/VOCaug/SegmentationClassAug
    python evaluate.py --config configs/pna_voc_r50_fcn.py --workdir runs/pna_voc \
      --config.eval.builder_kwargs.images=/data/VOC2012/JPEGImages_val \
      --config.eval.builder_kwargs.labels=/data/VOC2012/SegmentationClass_val

Not reproduced: the paper's VOC models come from an mmsegmentation branch (ResNetV1c stem);
this config uses detectron2's DeepLab stem ("R-52"); initialise it from ImageNet with
`--config.init_from=/data/R-52.pkl` (detectron2's DeepLab file; a torchvision .pth needs
`--config.model.stem=torchvision`), or from any PNA checkpoint. Losses: the
mmsegmentation FCN default (plain cross-entropy) for P0 and P1..P4. The other paper
settings derive from this file (configs/pna_cityscapes_*.py, pna_deepglobe.py,
pna_trans10k.py) and so does the small CPU one (pna_synthetic.py).

Multi-host: as configs/crm_paper.py (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID); batch_size is the global batch.
"""

import ml_collections

VOC_CLASSES = (
    "background,aeroplane,bicycle,bird,boat,bottle,bus,car,cat,chair,cow,diningtable,dog,"
    "horse,motorbike,person,pottedplant,sheep,sofa,train,tvmonitor"
)


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "pna"  # selects the PNA model, step, pipeline, optimiser and export
    # jax_refine.models.pna.build_pna keyword arguments (stored in the WORKDIR/pna export).
    config.model = ml_collections.ConfigDict(dict(
        coarse_head="fcn",  # 'fcn' (OS 32), 'deeplabv3' (OS 16), 'psp', 'semantic_fpn'
        num_classes=21,
        depth=50,  # ResNet depth (18/34 basic blocks for small models)
        width=64,  # ResNet stem / first-stage width
        stem="deeplab",  # detectron2 DeepLab stem or 'torchvision'
        embed_dims=(96, 192, 384, 768),  # PNA widths for res2..res5
        window_sizes=(9, 9, 9, 9),  # neighbourhood windows for res2..res5
        upsample_mode="nearest",  # how a stage upsamples the previous prediction
        use_sa=True,  # self-aggregation (Restormer) shortcut in every PNA layer
        pool_kernel_size=ml_collections.config_dict.placeholder(tuple),  # DeepLabV3 ASPP
        head_kwargs=ml_collections.ConfigDict(),  # coarse head widths ({} = official)
        freeze_backbone_bn=False,
    ))

    config.dataset = ml_collections.ConfigDict()
    config.dataset.name = "semantic_folder"  # or 'synthetic' (multi-class scenes)
    config.dataset.data_dir = ""  # TFDS build directory (required for builders)
    config.dataset.config = ""
    config.dataset.split = "train"
    config.dataset.label_key = "label"  # the record field holding the label map
    config.dataset.builder_kwargs = ml_collections.ConfigDict(dict(
        images="", labels="", class_names=VOC_CLASSES, split="train"))
    config.dataset.min_size = 0  # synthetic only: scene side range and object classes
    config.dataset.max_size = 0
    config.dataset.num_classes = 0

    # PnaAugment: scale ~ U[scale_range], crop with ignore padding, flip, colour jitter.
    config.augment = ml_collections.ConfigDict(dict(
        scale_range=(0.5, 2.0), brightness=0.2, contrast=0.05, saturation=0.05))
    # losses.pna_loss: loss type of P0 and of P1..P4, their weights, mining ratio.
    config.loss = ml_collections.ConfigDict(dict(
        coarse_loss="cross_entropy", stage_loss="cross_entropy", coarse_weight=1.0,
        stage_weight=0.1, ratio=0.2, ignore_label=255))

    config.crop_size = (512, 512)  # (height, width)
    config.batch_size = 16  # global batch (all devices of all hosts)
    config.total_steps = 20_000
    config.learning_rate = 1e-4  # AdamW, lr * (1 - step / total_steps) ** lr_power
    config.lr_power = 0.9
    config.weight_decay = 0.01  # decoupled (AdamW)
    config.clip_norm = 0.01  # global-norm clipping of the full gradient
    config.backbone_multiplier = 1.0  # backbone lr factor (official configs: 1.0)
    config.dtype = "float32"  # compute dtype: 'float32' or 'bfloat16' (params stay f32)
    config.seed = 0

    config.log_every = 50
    config.checkpoint_every = 2_000
    config.keep_checkpoints = 3
    config.export_every_checkpoint = False  # also refresh WORKDIR/pna at each checkpoint
    # PNA checkpoint dir / official .pth, or ImageNet ResNet weights (.pkl / .pth) for the
    # backbone ('' = scratch); see jax_refine.train.checkpoint.load_pna_init_variables.
    config.init_from = ""
    config.distributed = False  # force jax.distributed.initialize() (cluster auto-detect)
    # Every eval_every steps (and at the end) the loop runs this config's evaluation (the
    # `eval` block below, as evaluate.py) and writes its scalars and a panel to TensorBoard
    # and WORKDIR/eval/step_N; 0 = never.
    config.eval_every = 0
    config.profile_every = 0  # steps between 5-step jax.profiler traces (0 = none)
    # GPU: XLA_FLAGS=--xla_gpu_deterministic_ops=true, needed for bitwise-exact resume and
    # repeatable runs on GPUs (scatter-add gradients are otherwise non-deterministic); slower.
    config.deterministic = False

    # evaluate.py: per-stage mIoU, fwIoU, mACC, pACC on a semantic_folder split (or held-out
    # synthetic scenes when dataset.name is 'synthetic'); see jax_refine.train.evaluate_pna.
    config.eval = ml_collections.ConfigDict()
    config.eval.data_dir = ""  # '' = dataset.data_dir
    config.eval.builder_kwargs = ml_collections.ConfigDict(dict(
        images="", labels="", class_names=VOC_CLASSES, split="val"))
    config.eval.synthetic_size = 0  # synthetic only: scene side
    config.eval.num_images = 0  # 0 = all
    config.eval.num_pngs = 4  # side-by-side PNGs (image | P0 | P4 | ground truth)
    config.eval.batch_size = 8  # images per call, sharded over all devices (shape buckets)
    # Test-time resize (`evaluate_pna.ResizeProtocol`); the prediction is scored at the
    # original size. 'none' = native size; 'shortest_edge' = detectron2's ResizeShortestEdge
    # (min_size, max_size; Pillow bilinear); 'keep_ratio' = mmseg's Resize(img_scale=scale,
    # keep_ratio=True) (scale = (long, short); OpenCV bilinear; the mmseg configs use
    # (2048, 512)).
    config.eval.resize = ml_collections.ConfigDict(dict(
        mode="none", min_size=0, max_size=0, scale=(0, 0)))
    # Classes that count in the mIoU: 'gt_or_pred' (mmseg; a class predicted but absent from
    # the labels scores 0) or 'gt' (detectron2's SemSegEvaluator: classes in the labels only).
    config.eval.iou_classes = "gt_or_pred"
    # Class ids that mIoU and mACC average over (() = all), e.g. Trans10k's (1, 2).
    config.eval.mean_classes = ()
    return config
