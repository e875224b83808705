//! A memory-read bandwidth probe for the device: one pass of a reduction over a large
//! buffer, so that decode speed can be read against the device's roof (a memory-bound
//! decode cannot beat bandwidth / bytes of weights read per token).

use std::sync::Arc;

use super::{GpuError, device::Gpu};

/// Invocations per workgroup of the probe.
const PROBE_WORKGROUP: u32 = 256;

/// Workgroups the probe dispatches (each invocation strides over the buffer).
const PROBE_WORKGROUPS: u32 = 1024;

/// The probe's shader: every invocation sums `vec4`s `stride` apart.
const PROBE: &str = "@group(0) @binding(0) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> sums: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let stride = nwg.x * 256u;
    var acc = vec4<f32>(0.0);
    for (var i = gid.x; i < arrayLength(&src); i = i + stride) { acc = acc + src[i]; }
    sums[gid.x] = acc.x + acc.y + acc.z + acc.w;
}
";

/// A buffer in device memory and the pipeline that reads it once per [`ReadProbe::run`].
pub struct ReadProbe {
    gpu: Arc<Gpu>,
    pipeline: wgpu::ComputePipeline,
    group: wgpu::BindGroup,
    bytes: u64,
}

impl ReadProbe {
    /// A probe over `bytes` (capped at the device's binding limit, rounded down to 16).
    pub fn new(gpu: Arc<Gpu>, bytes: u64) -> Result<ReadProbe, GpuError> {
        let bytes = bytes.min(gpu.limits().max_binding_bytes) / 16 * 16;
        let pipeline = gpu.compile("read probe", PROBE)?;
        let device = gpu.device();
        let src = gpu.storage("read probe source", bytes);
        let sums = gpu.storage(
            "read probe sums",
            u64::from(PROBE_WORKGROUP * PROBE_WORKGROUPS) * 4,
        );
        let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: src.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: sums.as_entire_binding(),
                },
            ],
        });
        Ok(ReadProbe {
            gpu,
            pipeline,
            group,
            bytes,
        })
    }

    /// Bytes one run reads.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Reads the whole buffer once and waits for the device.
    pub fn run(&self) -> Result<(), GpuError> {
        let mut encoder = self
            .gpu
            .device()
            .create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&self.pipeline);
            pass.set_bind_group(0, &self.group, &[]);
            pass.dispatch_workgroups(PROBE_WORKGROUPS, 1, 1);
        }
        self.gpu.submit_and_read(encoder, &[]).map(|_| ())
    }
}
