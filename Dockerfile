# Build: docker build -t transship .
# Run:   docker run -p 5000:5000 -v transship-data:/var/lib/transship transship
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends libclang-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --locked --release --bin transship

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
