#!/usr/bin/env bash
# What cluster/aws.yaml needs in your AWS account before the first `ray up`, created once:
#
#   autoprune-head     instance profile of the head: starts and stops the GPU workers (EC2), gives
#                      them their profile (iam:PassRole on autoprune-worker's role, nothing else),
#                      reads the public parameter naming the Deep Learning AMI (SSM), attaches the
#                      MLflow volume, and reads and writes the bucket (MLflow artifacts, --storage)
#   autoprune-worker   instance profile of the GPU workers: the bucket, nothing else
#   autoprune-mlflow   an EBS volume in the head's availability zone for MLflow's database; it
#                      is not part of the cluster, so `ray down` leaves it (and the runs) alone
#
#   cluster/aws-setup.sh --bucket NAME [--region us-west-2] [--zone us-west-2a] [--volume-gb 20] [--dry-run]
#
# It runs the `aws` CLI with your credentials. What exists already is kept; the policies are
# written again each time. --dry-run prints the commands instead of running them.
set -euo pipefail

BUCKET=""
REGION=us-west-2
ZONE=us-west-2a
VOLUME_GB=20
DRY=0

die() { echo "cluster/aws-setup.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --bucket) BUCKET=${2:?--bucket needs a bucket name}; shift 2 ;;
    --region) REGION=${2:?--region needs a region}; shift 2 ;;
    --zone) ZONE=${2:?--zone needs an availability zone}; shift 2 ;;
    --volume-gb) VOLUME_GB=${2:?--volume-gb needs a size}; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) die "unknown option '$1'; options: --bucket NAME, --region R, --zone Z, --volume-gb N, --dry-run" ;;
  esac
done
[[ $BUCKET =~ ^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$ ]] || die "--bucket must be an S3 bucket name, got '$BUCKET'"
[[ $VOLUME_GB =~ ^[0-9]+$ ]] || die "--volume-gb must be a number, got '$VOLUME_GB'"
[[ $ZONE == "$REGION"* ]] || die "--zone $ZONE is not in --region $REGION"

run() { if [ "$DRY" = 1 ]; then echo "${*@Q}"; else "$@" >/dev/null; fi; }
exists() { [ "$DRY" = 0 ] && "$@" >/dev/null 2>&1; }

TRUST='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}'
S3="{\"Effect\":\"Allow\",\"Action\":[\"s3:ListBucket\",\"s3:GetBucketLocation\"],\"Resource\":\"arn:aws:s3:::$BUCKET\"},\
{\"Effect\":\"Allow\",\"Action\":[\"s3:GetObject\",\"s3:PutObject\",\"s3:DeleteObject\",\"s3:AbortMultipartUpload\"],\"Resource\":\"arn:aws:s3:::$BUCKET/*\"}"
WORKER_POLICY="{\"Version\":\"2012-10-17\",\"Statement\":[$S3]}"
HEAD_POLICY="{\"Version\":\"2012-10-17\",\"Statement\":[$S3,\
{\"Effect\":\"Allow\",\"Action\":\"iam:PassRole\",\"Resource\":\"arn:aws:iam::*:role/autoprune-worker\"},\
{\"Effect\":\"Allow\",\"Action\":[\"ssm:GetParameter\",\"ssm:GetParameters\"],\"Resource\":\"arn:aws:ssm:*::parameter/aws/service/deeplearning/*\"}]}"

profile() { # name, inline policy: a role EC2 may take, its policy, and the instance profile holding it
  local name=$1 policy=$2
  exists aws iam get-role --role-name "$name" ||
    run aws iam create-role --role-name "$name" --assume-role-policy-document "$TRUST"
  run aws iam put-role-policy --role-name "$name" --policy-name autoprune --policy-document "$policy"
  exists aws iam get-instance-profile --instance-profile-name "$name" ||
    run aws iam create-instance-profile --instance-profile-name "$name"
  if [ "$DRY" = 1 ] || [ -z "$(aws iam get-instance-profile --instance-profile-name "$name" \
    --query 'InstanceProfile.Roles[].RoleName' --output text)" ]; then
    run aws iam add-role-to-instance-profile --instance-profile-name "$name" --role-name "$name"
  fi
}

profile autoprune-worker "$WORKER_POLICY"
profile autoprune-head "$HEAD_POLICY"
# the EC2 rights Ray's autoscaler uses (launch, tag, describe, terminate, attach volumes)
run aws iam attach-role-policy --role-name autoprune-head --policy-arn arn:aws:iam::aws:policy/AmazonEC2FullAccess

volume_exists() {
  [ "$DRY" = 0 ] && aws ec2 describe-volumes --region "$REGION" --filters Name=tag:Name,Values=autoprune-mlflow \
    --query 'Volumes[].VolumeId' --output text | grep -q vol-
}
volume_exists || run aws ec2 create-volume --region "$REGION" --availability-zone "$ZONE" --size "$VOLUME_GB" \
  --volume-type gp3 --tag-specifications 'ResourceType=volume,Tags=[{Key=Name,Value=autoprune-mlflow}]'
[ "$DRY" = 1 ] || echo "autoprune-head, autoprune-worker and the autoprune-mlflow volume ($ZONE) are ready for cluster/aws.yaml"
