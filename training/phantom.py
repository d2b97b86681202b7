"""Synthetic FDOPA PET / T1C MR brain phantoms on the MNI152 2009 anatomy.

Every synthetic patient is the MNI152 2009 template (T1, grey- and white-matter
probability maps, brain mask; shipped inside nilearn, loaded offline) seen through
a seeded random rigid + scaling + smooth non-rigid transform, with 0-2 tumours and
peritumoural oedema. Per patient the generator returns, on one axial grid:

- ``t1c``: the post-contrast T1 volume (uint16) with bias field and Rician noise,
- ``uptake``: FDOPA-like uptake (SUV-like units) blurred to PET resolution with noise,
- ``oracle_uptake``: the expected uptake given what the T1C shows (no PET noise,
  mean striatal ratio, tumour uptake from the predictable part of the model only),
- ``fusion`` / ``oracle_fusion``: both rendered with :mod:`dicom_node.inference.fusion`,
- masks and the tumours' ground truth (model TBR, predictable TBR, measured TBRs).

All numbers that define realism are module constants (see ``docs/phantom.md``) and
are never tuned to a score. Coordinates: the grid is in DICOM patient coordinates
(LPS, mm), axial slices, rows running anterior -> posterior and columns running
patient right -> left; MNI coordinates are RAS.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from dicom_node.inference.fusion import fuse, to_uint8, window_t1c
from dicom_node.inference.fusion_style import FusionStyle

FloatVolume = NDArray[np.float32]
BoolVolume = NDArray[np.bool_]

# --- realism constants (documented in docs/phantom.md; never tuned to a score) -------------

#: Head field of view along the slice normal covered by default, mm.
DEFAULT_AXIAL_FOV_MM = 170.0
#: MNI point (RAS, mm) at the centre of the scanner field of view before patient offset.
FOV_CENTRE_MNI = (0.0, -17.0, 5.0)

#: Uptake of normal tissue, SUV-like units.
UPTAKE_GREY_MATTER = 1.1
UPTAKE_WHITE_MATTER = 0.8
UPTAKE_CSF = 0.3
#: Striatum-to-background ratio per patient, uniform in this range; the oracle uses its mean.
STRIATUM_RATIO_RANGE = (2.0, 3.0)
#: Uptake of necrotic core relative to background.
NECROSIS_RATIO = 0.5
#: Relative spatial heterogeneity (SD) of viable tumour uptake (random, not in the oracle).
TUMOUR_TEXTURE_SD = 0.12

#: PET resolution, Gaussian FWHM in mm (isotropic).
PET_FWHM_MM = 4.5
#: PET noise SD relative to the blurred uptake at uptake 1.0; scales with sqrt(uptake).
PET_NOISE_REL_SD = 0.08
#: Spatial correlation of the PET noise, Gaussian FWHM in mm.
PET_NOISE_FWHM_MM = 3.0
#: The head (outside which uptake is 0): brain mask widened by this Gaussian spread, mm.
HEAD_MARGIN_MM = 6.0

#: T1C Rician noise SD relative to the white-matter intensity.
T1C_NOISE_REL_SD = 0.02
#: T1C multiplicative bias field: exp(SD * smooth unit field).
T1C_BIAS_SD = 0.08
#: Stored T1C intensity of white matter (uint16 units).
T1C_WHITE_MATTER_VALUE = 1000.0

#: Patient pose: rotation SD about S-I (deg), tilt SD about the other axes (deg).
ROTATION_SI_SD_DEG = 4.0
ROTATION_TILT_SD_DEG = 2.0
MAX_SHIFT_MM = 10.0
SCALE_RANGE = (0.9, 1.1)
#: Non-rigid deformation: displacement SD per component (mm) on a ~40 mm control grid.
DEFORMATION_SD_MM = 1.5

#: Background margin: voxels within this distance of tumour, oedema or striatum are
#: excluded from the normal background used for TBR.
BACKGROUND_MARGIN_MM = 5.0

#: MNI (RAS, mm) centres and semi-axes of the striatal nuclei.
STRIATUM_NUCLEI: tuple[tuple[tuple[float, float, float], tuple[float, float, float]], ...] = (
    ((-13.0, 12.0, 10.0), (5.0, 9.0, 8.0)),  # right caudate head (RAS x < 0 is right)
    ((13.0, 12.0, 10.0), (5.0, 9.0, 8.0)),  # left caudate head
    ((-25.0, 2.0, 0.0), (5.0, 13.0, 9.0)),  # right putamen
    ((25.0, 2.0, 0.0), (5.0, 13.0, 9.0)),  # left putamen
)

NUMBER_OF_TUMOURS_P = (0.1, 0.6, 0.3)
TUMOUR_DIAMETER_RANGE_MM = (5.0, 30.0)


class TumourKind(StrEnum):
    """Appearance of a tumour on T1C."""

    SOLID_ENHANCING = "solid_enhancing"
    RIM_ENHANCING = "rim_enhancing"
    NON_ENHANCING = "non_enhancing"


TUMOUR_KIND_P: dict[TumourKind, float] = {
    TumourKind.SOLID_ENHANCING: 0.4,
    TumourKind.RIM_ENHANCING: 0.3,
    TumourKind.NON_ENHANCING: 0.3,
}


@dataclass(frozen=True)
class TumourUptakeModel:
    """Tumour-to-background ratio of viable tumour as a function of what T1C shows.

    ``eta = intercept + solid * [solid enhancing] + rim * [rim enhancing]
    + size * log2(diameter / 12 mm) + oedema * (oedema extent / 10 mm) + e``,
    ``e ~ N(0, noise_sd^2)`` and ``TBR = 1 + 3 * sigmoid(eta)``, so TBR lies in (1, 4).
    The predictable part is ``E[TBR | features]`` (integral over ``e``).
    """

    intercept: float = -1.0
    solid: float = 1.0
    rim: float = 1.3
    size: float = 0.35
    oedema: float = 0.3
    noise_sd: float = 0.9
    tbr_low: float = 1.0
    tbr_span: float = 3.0

    def linear_predictor(
        self, kind: TumourKind, diameter_mm: float, oedema_mm: float
    ) -> float:
        return (
            self.intercept
            + self.solid * (kind is TumourKind.SOLID_ENHANCING)
            + self.rim * (kind is TumourKind.RIM_ENHANCING)
            + self.size * math.log2(diameter_mm / 12.0)
            + self.oedema * (oedema_mm / 10.0)
        )

    def tbr(self, eta: NDArray[np.float64] | float) -> NDArray[np.float64]:
        return self.tbr_low + self.tbr_span / (1.0 + np.exp(-np.asarray(eta, dtype=np.float64)))

    def expected_tbr(self, linear: NDArray[np.float64] | float) -> NDArray[np.float64]:
        """E[TBR | features] by 40-point Gauss-Hermite quadrature over the noise."""
        nodes, weights = np.polynomial.hermite_e.hermegauss(40)
        weights = weights / weights.sum()
        lin = np.asarray(linear, dtype=np.float64)
        values = self.tbr(lin[..., None] + self.noise_sd * nodes)
        return np.asarray((values * weights).sum(axis=-1))

    def explained_fraction(self, samples: int = 200_000, seed: int = 0) -> float:
        """Share of tumour-TBR variance explained by the T1C features (Monte Carlo)."""
        rng = np.random.default_rng(seed)
        linear = np.empty(samples)
        for i in range(samples):
            kind, diameter, oedema = draw_tumour_features(rng)
            linear[i] = self.linear_predictor(kind, diameter, oedema)
        predicted = self.expected_tbr(linear)
        actual = self.tbr(linear + self.noise_sd * rng.standard_normal(samples))
        return float(np.var(predicted) / np.var(actual))


TUMOUR_MODEL = TumourUptakeModel()


def draw_tumour_features(rng: np.random.Generator) -> tuple[TumourKind, float, float]:
    """Kind, diameter (mm, log-uniform 5-30) and oedema extent (mm) of one tumour."""
    kinds = list(TUMOUR_KIND_P)
    kind = kinds[int(rng.choice(len(kinds), p=list(TUMOUR_KIND_P.values())))]
    low, high = TUMOUR_DIAMETER_RANGE_MM
    diameter = float(math.exp(rng.uniform(math.log(low), math.log(high))))
    if kind is TumourKind.SOLID_ENHANCING:
        oedema = float(rng.uniform(2.0, 15.0))
    elif kind is TumourKind.RIM_ENHANCING:
        oedema = float(rng.uniform(5.0, 20.0))
    else:
        oedema = 0.0 if rng.random() < 0.5 else float(rng.uniform(0.0, 6.0))
    return kind, diameter, oedema


# --- geometry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhantomGeometry:
    """The axial acquisition grid shared by the T1C, PET and fusion series."""

    rows: int = 256
    cols: int = 256
    pixel_spacing_mm: float = 1.0
    slice_spacing_mm: float = 2.0
    n_slices: int | None = None

    def __post_init__(self) -> None:
        if self.rows < 16 or self.cols < 16:
            raise ValueError("rows and cols must be at least 16")
        if self.pixel_spacing_mm <= 0 or self.slice_spacing_mm <= 0:
            raise ValueError("spacings must be positive")
        if self.n_slices is not None and self.n_slices < 1:
            raise ValueError("n_slices must be positive")

    @property
    def slices(self) -> int:
        if self.n_slices is not None:
            return self.n_slices
        return round(DEFAULT_AXIAL_FOV_MM / self.slice_spacing_mm)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.slices, self.rows, self.cols)

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel spacing along (slice, row, column)."""
        return (self.slice_spacing_mm, self.pixel_spacing_mm, self.pixel_spacing_mm)

    def axis_mm(self, axis: int) -> NDArray[np.float64]:
        """LPS coordinate along the slice (0: z), row (1: y) or column (2: x) axis."""
        n = self.shape[axis]
        return (np.arange(n, dtype=np.float64) - (n - 1) / 2.0) * np.float64(self.spacing_mm[axis])

    def image_position(self, slice_index: int) -> tuple[float, float, float]:
        """ImagePositionPatient (LPS, mm) of the first pixel of a slice."""
        return (
            float(self.axis_mm(2)[0]),
            float(self.axis_mm(1)[0]),
            float(self.axis_mm(0)[slice_index]),
        )


# --- the patient ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhantomTumour:
    """One lesion; centre in DICOM patient coordinates (LPS, mm)."""

    label: int
    kind: TumourKind
    centre_mm: tuple[float, float, float]
    radius_mm: float
    oedema_mm: float
    tbr_model: float
    tbr_predicted: float
    tbr_max: float = float("nan")
    tbr_mean: float = float("nan")
    oracle_tbr_max: float = float("nan")
    oracle_tbr_mean: float = float("nan")
    voxels: int = 0


@dataclass(frozen=True)
class PhantomPatient:
    index: int
    seed: int
    patient_id: str
    patient_name: str
    geometry: PhantomGeometry
    t1c: NDArray[np.uint16]
    uptake: FloatVolume
    oracle_uptake: FloatVolume
    pet_rescale_slope: float
    fusion: NDArray[np.uint8]
    oracle_fusion: NDArray[np.uint8]
    tumour_labels: NDArray[np.uint8]
    oedema: BoolVolume
    brain_mask: BoolVolume
    striatum_mask: BoolVolume
    background_mask: BoolVolume
    background_mean: float
    striatum_ratio: float
    tumours: tuple[PhantomTumour, ...]
    pose: dict[str, float] = field(default_factory=dict)
    fusion_style: FusionStyle = field(default_factory=FusionStyle)


@dataclass(frozen=True)
class _Template:
    t1: NDArray[np.float32]
    grey: NDArray[np.float32]
    white: NDArray[np.float32]
    mask: NDArray[np.float32]
    origin_mm: NDArray[np.float64]  # RAS mm of voxel (0, 0, 0), per template array
    resolution_mm: tuple[float, float]  # (t1 + mask, grey + white)
    white_level: float  # median T1 of voxels with white-matter probability > 0.9
    grey_level: float


@functools.lru_cache(maxsize=1)
def _template() -> _Template:
    from nilearn import datasets

    t1_img = datasets.load_mni152_template(resolution=1)
    mask_img = datasets.load_mni152_brain_mask(resolution=1)
    grey_img = datasets.load_mni152_gm_template(resolution=2)
    white_img = datasets.load_mni152_wm_template(resolution=2)
    origin = np.array([t1_img.affine[:3, 3], grey_img.affine[:3, 3]], dtype=np.float64)
    t1 = np.asarray(t1_img.get_fdata(), dtype=np.float32)
    grey = np.asarray(grey_img.get_fdata(), dtype=np.float32)
    white = np.asarray(white_img.get_fdata(), dtype=np.float32)
    step = round(grey_img.affine[0, 0] / t1_img.affine[0, 0])
    t1_coarse = t1[::step, ::step, ::step][: grey.shape[0], : grey.shape[1], : grey.shape[2]]
    return _Template(
        t1=t1,
        grey=grey,
        white=white,
        mask=np.asarray(mask_img.get_fdata(), dtype=np.float32),
        origin_mm=origin,
        resolution_mm=(float(t1_img.affine[0, 0]), float(grey_img.affine[0, 0])),
        white_level=float(np.median(t1_coarse[white > 0.9])),
        grey_level=float(np.median(t1_coarse[grey > 0.9])),
    )


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], spacing_mm: tuple[float, ...],
                  correlation_mm: float) -> FloatVolume:
    """Unit-SD smooth random field: white noise on a coarse grid, linearly upsampled."""
    coarse_shape = tuple(max(2, math.ceil(n * s / correlation_mm) + 1)
                         for n, s in zip(shape, spacing_mm, strict=True))
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape), 0.7, mode="wrap")
    coarse = (coarse - coarse.mean()) / (coarse.std() + 1e-12)
    full = coarse.astype(np.float32)
    for axis, (c, n) in enumerate(zip(coarse_shape, shape, strict=True)):
        full = np.moveaxis(np.tensordot(_linear_weights(c, n), full, axes=([1], [axis])), 0, axis)
    return np.ascontiguousarray(full, dtype=np.float32)


def _linear_weights(coarse: int, fine: int) -> NDArray[np.float32]:
    """(fine, coarse) matrix of linear interpolation from ``coarse`` to ``fine`` samples."""
    position = np.linspace(0.0, coarse - 1.0, fine)
    low = np.minimum(np.floor(position).astype(int), coarse - 2)
    frac = position - low
    weights = np.zeros((fine, coarse), dtype=np.float32)
    weights[np.arange(fine), low] = 1.0 - frac
    weights[np.arange(fine), low + 1] = frac
    return weights


def _rotation(rng: np.random.Generator) -> tuple[NDArray[np.float64], dict[str, float]]:
    yaw = math.radians(rng.normal(0.0, ROTATION_SI_SD_DEG))
    pitch = math.radians(rng.normal(0.0, ROTATION_TILT_SD_DEG))
    roll = math.radians(rng.normal(0.0, ROTATION_TILT_SD_DEG))
    rz = np.array([[math.cos(yaw), -math.sin(yaw), 0], [math.sin(yaw), math.cos(yaw), 0],
                   [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(pitch), -math.sin(pitch)],
                   [0, math.sin(pitch), math.cos(pitch)]])
    ry = np.array([[math.cos(roll), 0, math.sin(roll)], [0, 1, 0],
                   [-math.sin(roll), 0, math.cos(roll)]])
    pose = {"rotation_si_deg": math.degrees(yaw), "tilt_lr_deg": math.degrees(pitch),
            "tilt_ap_deg": math.degrees(roll)}
    return rz @ rx @ ry, pose


def _sample(volume: NDArray[np.float32], mni: NDArray[np.float32], origin: NDArray[np.float64],
            resolution: float) -> FloatVolume:
    index = (mni - origin.astype(np.float32)[:, None, None, None]) / np.float32(resolution)
    return np.asarray(ndimage.map_coordinates(volume, index, order=1, cval=0.0,
                                              prefilter=False), dtype=np.float32)


def _gaussian_mm(volume: FloatVolume, fwhm_mm: float, spacing: tuple[float, float, float]
                 ) -> FloatVolume:
    sigma = [fwhm_mm / (2.0 * math.sqrt(2.0 * math.log(2.0))) / s for s in spacing]
    return np.asarray(ndimage.gaussian_filter(volume, sigma, mode="constant"), dtype=np.float32)


def patient_rng(index: int, seed: int) -> np.random.Generator:
    """The generator of one synthetic patient: independent of how many others exist."""
    return np.random.default_rng([seed, index])


def generate_patient(
    index: int,
    seed: int,
    geometry: PhantomGeometry | None = None,
    style: FusionStyle | None = None,
    tumour_model: TumourUptakeModel = TUMOUR_MODEL,
    tumour_count_p: tuple[float, float, float] = NUMBER_OF_TUMOURS_P,
) -> PhantomPatient:
    """One synthetic patient, fully determined by ``(index, seed, geometry)``.

    ``tumour_count_p`` (probabilities of 0, 1 and 2 tumours) lets a training cohort be
    enriched with tumours; the draw consumes the same random numbers whatever the
    probabilities, so the default reproduces every standard cohort exactly.
    """
    geometry = geometry or PhantomGeometry()
    style = style or FusionStyle()
    rng = patient_rng(index, seed)
    tpl = _template()
    shape = geometry.shape
    spacing = geometry.spacing_mm

    # Scanner RAS coordinates (relative to the FOV centre) of every output voxel.
    z_lps, y_lps, x_lps = (geometry.axis_mm(a).astype(np.float32) for a in range(3))
    q = np.empty((3, *shape), dtype=np.float32)
    q[0] = -x_lps[None, None, :]
    q[1] = -y_lps[None, :, None]
    q[2] = z_lps[:, None, None]

    rotation, pose = _rotation(rng)
    direction = rng.standard_normal(3)
    shift = direction / np.linalg.norm(direction) * rng.uniform(0.0, MAX_SHIFT_MM)
    scale = float(rng.uniform(*SCALE_RANGE))
    pose.update({"scale": scale, "shift_x_mm": float(shift[0]), "shift_y_mm": float(shift[1]),
                 "shift_z_mm": float(shift[2])})
    inverse = (rotation.T / scale).astype(np.float32)
    centred = q - shift.astype(np.float32)[:, None, None, None]
    mni = np.einsum("ij,j...->i...", inverse, centred, optimize=True)
    mni += np.asarray(FOV_CENTRE_MNI, dtype=np.float32)[:, None, None, None]
    for axis in range(3):
        mni[axis] += DEFORMATION_SD_MM * _smooth_field(rng, shape, spacing, 40.0)
    del q, centred

    t1 = _sample(tpl.t1, mni, tpl.origin_mm[0], tpl.resolution_mm[0])
    brain_p = _sample(tpl.mask, mni, tpl.origin_mm[0], tpl.resolution_mm[0])
    grey = _sample(tpl.grey, mni, tpl.origin_mm[1], tpl.resolution_mm[1])
    white = _sample(tpl.white, mni, tpl.origin_mm[1], tpl.resolution_mm[1])
    brain = brain_p >= 0.5
    grey *= brain_p
    white *= brain_p
    csf = np.clip(brain_p - grey - white, 0.0, 1.0)

    striatum = np.zeros(shape, dtype=bool)
    for centre, axes in STRIATUM_NUCLEI:
        d2 = sum(((mni[a] - centre[a]) / axes[a]) ** 2 for a in range(3))
        striatum |= d2 <= 1.0
    striatum &= brain

    # Tumours, placed in patient space at locations chosen by their MNI coordinates.
    n_tumours = int(rng.choice(3, p=list(tumour_count_p)))
    labels = np.zeros(shape, dtype=np.uint8)
    necrosis = np.zeros(shape, dtype=bool)
    oedema = np.zeros(shape, dtype=bool)
    shape_noise = _smooth_field(rng, shape, spacing, 12.0)
    placed: list[tuple[NDArray[np.float64], float, TumourKind, float, float, float, float]] = []
    allowed = brain & (mni[2] > -20.0) & ~((mni[1] < -50.0) & (mni[2] < 5.0)) & (
        np.abs(mni[0]) > 6.0)
    for centre, axes in STRIATUM_NUCLEI:
        d = np.sqrt(sum((mni[a] - centre[a]) ** 2 for a in range(3)))
        allowed &= d > max(axes) + 8.0
    candidates = np.argwhere(allowed)
    coords_lps = (z_lps, y_lps, x_lps)
    for _ in range(n_tumours):
        kind, diameter, oedema_mm = draw_tumour_features(rng)
        radius = diameter / 2.0
        linear = tumour_model.linear_predictor(kind, diameter, oedema_mm)
        tbr_model = float(tumour_model.tbr(linear + tumour_model.noise_sd * rng.standard_normal()))
        tbr_predicted = float(tumour_model.expected_tbr(linear))
        centre_idx = _pick_centre(rng, candidates, brain, allowed, radius, geometry, placed)
        if centre_idx is None:
            continue
        placed.append((centre_idx, radius, kind, oedema_mm, tbr_model, tbr_predicted, diameter))

    axis_scales: list[NDArray[np.float64]] = []
    for label, (centre_idx, radius, kind, oedema_mm, *_rest) in enumerate(placed, start=1):
        axes_mm = radius * rng.uniform(0.8, 1.2, size=3)
        axis_scales.append(axes_mm)
        reach = radius * 1.3 + oedema_mm + 2.0
        box = tuple(
            slice(max(0, int(centre_idx[a] - reach / spacing[a]) - 1),
                  min(shape[a], int(centre_idx[a] + reach / spacing[a]) + 2))
            for a in range(3))
        grids = np.meshgrid(*[coords_lps[a][box[a]] - coords_lps[a][int(centre_idx[a])]
                              for a in range(3)], indexing="ij")
        ellipsoid = np.sqrt(sum((grids[a] / axes_mm[a]) ** 2 for a in range(3)))
        ellipsoid *= 1.0 + 0.12 * shape_noise[box]
        inside = (ellipsoid <= 1.0) & brain[box] & (labels[box] == 0)
        labels[box][inside] = label
        if kind is TumourKind.RIM_ENHANCING:
            rim_mm = float(np.clip(0.25 * radius, 1.5, 4.0))
            necrosis[box] |= inside & ((1.0 - ellipsoid) * radius > rim_mm)
        if oedema_mm > 0:
            outer = ellipsoid <= 1.0 + oedema_mm / radius
            oedema[box] |= outer & brain[box] & (white[box] > 0.35) & (labels[box] == 0)
    oedema &= labels == 0

    # --- T1C ---
    wm_level = tpl.white_level
    gm_level = tpl.grey_level
    t1c = t1.copy()
    t1c[oedema] *= 0.85
    texture = _smooth_field(rng, shape, spacing, 6.0)
    for label, (_c, _r, kind, *_rest) in enumerate(placed, start=1):
        lesion = labels == label
        if kind is TumourKind.SOLID_ENHANCING:
            value = 1.25 * wm_level * (1.0 + 0.05 * texture[lesion])
        elif kind is TumourKind.RIM_ENHANCING:
            value = np.where(necrosis[lesion], 0.35 * wm_level, 1.3 * wm_level)
        else:
            value = 0.85 * gm_level * (1.0 + 0.04 * texture[lesion])
        t1c[lesion] = value
    bias = np.exp(T1C_BIAS_SD * _smooth_field(rng, shape, spacing, 80.0))
    t1c *= bias
    sigma = T1C_NOISE_REL_SD * wm_level
    real = t1c + sigma * rng.standard_normal(shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(shape, dtype=np.float32)
    magnitude = np.sqrt(real * real + imag * imag)
    t1c_u16 = np.clip(np.rint(magnitude * (T1C_WHITE_MATTER_VALUE / wm_level)), 0, 65535
                      ).astype(np.uint16)

    # --- uptake ---
    normal = (UPTAKE_GREY_MATTER * grey + UPTAKE_WHITE_MATTER * white + UPTAKE_CSF * csf
              ).astype(np.float32)
    excluded = (labels > 0) | oedema | striatum
    near = np.zeros(shape, dtype=bool)
    if excluded.any():
        near = ndimage.distance_transform_edt(~excluded, sampling=spacing) <= BACKGROUND_MARGIN_MM
    background = brain & ~near
    background_mean = float(normal[background].mean())
    striatum_ratio = float(rng.uniform(*STRIATUM_RATIO_RANGE))
    mean_striatum_ratio = float(np.mean(STRIATUM_RATIO_RANGE))
    true = normal.copy()
    oracle = normal.copy()
    true[striatum] = striatum_ratio * background_mean
    oracle[striatum] = mean_striatum_ratio * background_mean
    heterogeneity = _smooth_field(rng, shape, spacing, 5.0)
    for label, (_c, _r, _k, _o, tbr_model, tbr_predicted, _d) in enumerate(placed, start=1):
        lesion = labels == label
        viable = lesion & ~necrosis
        dead = lesion & necrosis
        variation = 1.0 + TUMOUR_TEXTURE_SD * heterogeneity[viable]
        variation /= variation.mean() if variation.size else 1.0
        true[viable] = tbr_model * background_mean * variation
        oracle[viable] = tbr_predicted * background_mean
        true[dead] = NECROSIS_RATIO * background_mean
        oracle[dead] = NECROSIS_RATIO * background_mean

    head = _gaussian_mm(brain.astype(np.float32), HEAD_MARGIN_MM, spacing) > 0.01
    blurred = _gaussian_mm(true, PET_FWHM_MM, spacing)
    oracle_blurred = np.where(head, _gaussian_mm(oracle, PET_FWHM_MM, spacing), 0.0)
    noise = _gaussian_mm(rng.standard_normal(shape, dtype=np.float32), PET_NOISE_FWHM_MM, spacing)
    noise /= noise.std() + 1e-12
    noisy = blurred + PET_NOISE_REL_SD * np.sqrt(np.maximum(blurred, 0.0)) * noise
    noisy = np.where(head, np.maximum(noisy, 0.0), 0.0).astype(np.float32)
    slope = pet_rescale_slope(float(noisy.max()))
    uptake = (np.rint(noisy / slope).astype(np.uint16).astype(np.float32) * np.float32(slope))
    oracle_uptake = np.asarray(oracle_blurred, dtype=np.float32)

    grey_t1c = window_t1c(t1c_u16)
    fusion = to_uint8(fuse(grey_t1c, uptake, style))
    oracle_fusion = to_uint8(fuse(grey_t1c, oracle_uptake, style))

    noisy_bg = float(uptake[background].mean())
    oracle_bg = float(oracle_uptake[background].mean())
    tumours = []
    for label, (centre_idx, radius, kind, oedema_mm, tbr_model, tbr_predicted, _d) in enumerate(
            placed, start=1):
        lesion = labels == label
        if not lesion.any():
            continue
        centre_mm = tuple(float(v) for v in (x_lps[int(centre_idx[2])],
                                              y_lps[int(centre_idx[1])],
                                              z_lps[int(centre_idx[0])]))
        tumours.append(PhantomTumour(
            label=label, kind=kind, centre_mm=centre_mm, radius_mm=float(radius),  # type: ignore[arg-type]
            oedema_mm=float(oedema_mm), tbr_model=tbr_model, tbr_predicted=tbr_predicted,
            tbr_max=float(uptake[lesion].max() / noisy_bg),
            tbr_mean=float(uptake[lesion].mean() / noisy_bg),
            oracle_tbr_max=float(oracle_uptake[lesion].max() / oracle_bg),
            oracle_tbr_mean=float(oracle_uptake[lesion].mean() / oracle_bg),
            voxels=int(lesion.sum())))

    return PhantomPatient(
        index=index, seed=seed, patient_id=f"PH{index + 1:04d}",
        patient_name=f"PHANTOM^P{index + 1:03d}", geometry=geometry, t1c=t1c_u16,
        uptake=uptake, oracle_uptake=oracle_uptake, pet_rescale_slope=slope, fusion=fusion,
        oracle_fusion=oracle_fusion, tumour_labels=labels, oedema=oedema, brain_mask=brain,
        striatum_mask=striatum, background_mask=background, background_mean=noisy_bg,
        striatum_ratio=striatum_ratio, tumours=tuple(tumours), pose=pose, fusion_style=style)


def pet_rescale_slope(maximum: float) -> float:
    """RescaleSlope that stores uptake up to ``maximum`` in uint16, exact as a DS string."""
    if maximum <= 6.0:
        return 1e-4
    return float(f"{maximum / 60000.0:.4g}")


def _pick_centre(
    rng: np.random.Generator,
    candidates: NDArray[np.intp],
    brain: BoolVolume,
    allowed: BoolVolume,
    radius: float,
    geometry: PhantomGeometry,
    placed: list[tuple[NDArray[np.float64], float, TumourKind, float, float, float, float]],
) -> NDArray[np.float64] | None:
    """A voxel index whose sphere of ``0.8 * radius`` stays in the brain, away from others."""
    if len(candidates) == 0:
        return None
    spacing = np.asarray(geometry.spacing_mm)
    shape = np.asarray(geometry.shape)
    offsets = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]],
                       dtype=np.float64)
    for _ in range(200):
        centre = candidates[int(rng.integers(len(candidates)))].astype(np.float64)
        probes = np.rint(centre + offsets * (0.8 * radius + 2.0) / spacing).astype(int)
        if ((probes < 0) | (probes >= shape)).any():
            continue
        if not all(brain[tuple(p)] and allowed[tuple(p)] for p in probes):
            continue
        if any(np.linalg.norm((centre - other) * spacing) < radius + other_r + 6.0
               for other, other_r, *_ in placed):
            continue
        found: NDArray[np.float64] = np.asarray(centre, dtype=np.float64)
        return found
    return None
