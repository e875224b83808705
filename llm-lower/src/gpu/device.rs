//! The wgpu device a GPU program runs on: adapter choice, limits, pipeline creation with
//! every error captured as a value, uploads and readback.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use super::{GpuError, Limits, validate, wgsl::Shader};

/// How to open a device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuOptions {
    /// Ask only for WebGPU's default limits (128 MiB bindings, 8 storage buffers per
    /// stage), so that what runs here runs on any WebGPU device; otherwise the adapter's
    /// own limits.
    pub webgpu_limits: bool,
    /// Take a CPU (software) adapter even where a GPU exists (lavapipe: the CI set-up).
    pub fallback_adapter: bool,
    /// Cap the bytes of one storage binding below what the device allows (tests use it to
    /// make small models split their weights as large ones must).
    pub max_binding_bytes: Option<u64>,
    /// Keep every weight in `f32` even where the device has `shader-f16` (the fallback
    /// path, for tests on devices that have it).
    pub no_f16: bool,
    /// Key positions one attention workgroup covers before the context is split across
    /// workgroups (default [`ATTENTION_CHUNK`]).
    pub attention_chunk: Option<usize>,
    /// Reduce through workgroup memory only, even where the device has subgroup
    /// operations (the portable path, for tests on devices that have them).
    pub no_subgroups: bool,
}

/// Key positions per attention workgroup: longer contexts are split across workgroups
/// (and merged by a second dispatch), so that a long decode keeps the device busy.
pub const ATTENTION_CHUNK: usize = 256;

/// How long a readback waits for the GPU before it reports a wedged device.
const WAIT: Duration = Duration::from_secs(120);

/// Held while a device is opened: NVIDIA's Vulkan driver races on instances and devices
/// created on several threads at once (wgpu issue 5930; on an H100, test suites that open
/// a device per test crashed with SIGSEGV when their tests ran in parallel, and passed one
/// at a time), so this process opens one at a time. Devices are still dropped on any
/// thread: wgpu frees a device when its last buffer or pipeline goes, which a lock here
/// could not cover.
static OPENING: Mutex<()> = Mutex::new(());

/// One wgpu device and queue, with the compiled pipelines of every program on it.
pub struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: Limits,
    /// Whether shaders may read `f16` storage.
    f16: bool,
    /// Key positions per attention workgroup.
    attention_chunk: usize,
    /// Whether reductions use subgroup operations.
    subgroups: bool,
    /// Errors wgpu reported outside an error scope (a dispatch it rejected), collected
    /// here instead of wgpu's default handler, which panics.
    errors: Arc<Mutex<Vec<String>>>,
    pipelines: Mutex<HashMap<String, wgpu::ComputePipeline>>,
}

impl Gpu {
    /// Opens the best adapter wgpu finds (a GPU before a CPU adapter), honouring
    /// `WGPU_BACKEND`; an error, not a panic, when there is none.
    pub fn new(options: &GpuOptions) -> Result<Gpu, GpuError> {
        let _one_at_a_time = OPENING.lock().unwrap_or_else(PoisonError::into_inner);
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            force_fallback_adapter: options.fallback_adapter,
            compatible_surface: None,
            ..Default::default()
        }))
        .map_err(|e| GpuError(format!("no GPU adapter: {e}")))?;
        let mut required_limits = if options.webgpu_limits {
            wgpu::Limits::default()
        } else {
            adapter.limits()
        };
        if let Some(cap) = options.max_binding_bytes {
            let limit = &mut required_limits.max_storage_buffer_binding_size;
            *limit = (*limit).min(cap.max(4));
        }
        // f16 storage halves the bytes of weights that are exactly f16 (converted f16
        // models); without the feature they stay f32.
        let features = adapter.features() & (wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP);
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("llmc"),
            required_features: features,
            required_limits: required_limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| GpuError(format!("GPU device: {e}")))?;
        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&errors);
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut errors) = sink.lock() {
                errors.push(e.to_string());
            }
        }));
        Ok(Gpu {
            f16: features.contains(wgpu::Features::SHADER_F16) && !options.no_f16,
            attention_chunk: options.attention_chunk.unwrap_or(ATTENTION_CHUNK).max(1),
            subgroups: features.contains(wgpu::Features::SUBGROUP) && !options.no_subgroups,
            info: adapter.get_info(),
            limits: Limits::of(&required_limits),
            device,
            queue,
            errors,
            pipelines: Mutex::new(HashMap::new()),
        })
    }

    /// The adapter's name and backend, for logs (`llvmpipe (LLVM 15.0.6, 256 bits) on
    /// Vulkan`).
    pub fn adapter(&self) -> String {
        format!("{} on {:?}", self.info.name, self.info.backend)
    }

    /// Whether weights that are exactly `f16` are stored as `f16` (the device has
    /// `shader-f16`).
    pub fn has_f16(&self) -> bool {
        self.f16
    }

    /// Whether reductions use subgroup operations (the device has them).
    pub fn has_subgroups(&self) -> bool {
        self.subgroups
    }

    /// Key positions one attention workgroup covers before the context is split.
    pub fn attention_chunk(&self) -> usize {
        self.attention_chunk
    }

    /// The limits programs are compiled for.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub(super) fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The pipeline of `shader`, created once per device: the source is validated with
    /// naga first, and the device's own complaints come back as an error.
    pub(super) fn pipeline(&self, shader: &Shader) -> Result<wgpu::ComputePipeline, GpuError> {
        let source = shader.source_for(self.subgroups);
        let mut pipelines = self
            .pipelines
            .lock()
            .map_err(|_| GpuError("the pipeline cache is poisoned".into()))?;
        if let Some(p) = pipelines.get(&source) {
            return Ok(p.clone());
        }
        let pipeline = self.compile(&shader.name(), &source)?;
        pipelines.insert(source, pipeline.clone());
        Ok(pipeline)
    }

    /// The compute pipeline of WGSL `source` (entry point `main`), validated with naga
    /// first; the device's own complaints come back as an error naming `label`.
    pub(super) fn compile(
        &self,
        label: &str,
        source: &str,
    ) -> Result<wgpu::ComputePipeline, GpuError> {
        validate(source).map_err(|e| GpuError(format!("{label}: {e}")))?;
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(label),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(label),
                layout: None,
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(GpuError(format!("{label}: {e}")));
        }
        Ok(pipeline)
    }

    /// A storage buffer of `bytes` (rounded up to 4; zeroed).
    pub(super) fn storage(&self, label: &str, bytes: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.max(4).next_multiple_of(4),
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        })
    }

    /// A storage buffer holding `data` (padded to a multiple of 4 bytes).
    pub(super) fn upload(&self, label: &str, data: &[u8]) -> wgpu::Buffer {
        let buffer = self.storage(label, data.len() as u64);
        self.write(&buffer, 0, data);
        buffer
    }

    /// Writes `data` at `offset` of `buffer` before the next submission runs (padded to a
    /// multiple of 4 bytes, as wgpu requires).
    pub(super) fn write(&self, buffer: &wgpu::Buffer, offset: u64, data: &[u8]) {
        if data.len().is_multiple_of(4) {
            self.queue.write_buffer(buffer, offset, data);
        } else {
            let mut padded = data.to_vec();
            padded.resize(data.len().next_multiple_of(4), 0);
            self.queue.write_buffer(buffer, offset, &padded);
        }
    }

    /// Submits `encoder` after copying each `(buffer, bytes)` into a staging buffer, waits,
    /// and returns the bytes read back; any error wgpu reported since the last call fails
    /// the readback.
    pub(super) fn submit_and_read(
        &self,
        mut encoder: wgpu::CommandEncoder,
        reads: &[(&wgpu::Buffer, u64)],
    ) -> Result<Vec<Vec<u8>>, GpuError> {
        let staging: Vec<(wgpu::Buffer, u64)> = reads
            .iter()
            .map(|&(buffer, bytes)| {
                let size = bytes.max(4).next_multiple_of(4);
                let stage = self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("readback"),
                    size,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                encoder.copy_buffer_to_buffer(buffer, 0, &stage, 0, size);
                (stage, bytes)
            })
            .collect();
        self.queue.submit([encoder.finish()]);
        for (stage, _) in &staging {
            stage.slice(..).map_async(wgpu::MapMode::Read, |_| {});
        }
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: None,
                timeout: Some(WAIT),
            })
            .map_err(|e| GpuError(format!("waiting for the GPU: {e}")))?;
        self.check()?;
        staging
            .iter()
            .map(|(stage, bytes)| {
                let view = stage
                    .slice(..)
                    .get_mapped_range()
                    .map_err(|e| GpuError(format!("reading back: {e}")))?;
                let out = view[..*bytes as usize].to_vec();
                drop(view);
                stage.unmap();
                Ok(out)
            })
            .collect()
    }

    /// Fails with the errors wgpu reported outside an error scope since the last check.
    pub(super) fn check(&self) -> Result<(), GpuError> {
        let mut errors = self
            .errors
            .lock()
            .map_err(|_| GpuError("the error sink is poisoned".into()))?;
        if errors.is_empty() {
            return Ok(());
        }
        let all = errors.join("; ");
        errors.clear();
        Err(GpuError(format!("the GPU rejected work: {all}")))
    }
}
