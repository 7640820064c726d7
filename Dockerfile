# Build: docker build -t transship .
# Run:   docker run -p 5000:5000 -v transship-data:/var/lib/transship transship
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends libclang-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The release profile (Cargo.toml) keeps line tables for transship's own code only: RocksDB,
# built from source here, gets no debug information (its build sees DEBUG=false), which keeps
# the binary near 60 MB instead of 500 MB. Fail the build if that ever regresses.
RUN cargo build --locked --release --bin transship \
    && size=$(stat -c %s target/release/transship) \
    && echo "transship binary: $size bytes" \
    && test "$size" -lt 80000000

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/transship transship && mkdir -p /var/lib/transship /etc/transship \
    && chown transship /var/lib/transship
COPY --from=build /src/target/release/transship /usr/local/bin/transship
COPY config/transship.toml /etc/transship/transship.toml
# In a container the registry must listen on all interfaces; anonymous access still follows
# each project's anonymous_from networks (loopback only by default).
RUN sed -i 's|^listen = .*|listen = "0.0.0.0:5000"|; s|^data_dir = .*|data_dir = "/var/lib/transship"|' /etc/transship/transship.toml
USER transship
EXPOSE 5000
ENTRYPOINT ["/usr/local/bin/transship"]
CMD ["serve", "--config", "/etc/transship/transship.toml"]
